//! Any bytes as a plugin configuration: an error or a config, never a panic; and an error
//! never echoes a string *value* (it could be a token). Field names are echoed on purpose
//! (`unknown field ...`), so the check applies when the marker only ever stands in values:
//! anywhere inside a string value of a JSON document (escaped quotes around it included), or,
//! for bytes that are not one JSON document, as a whole string value (`: "marker"`).
#![no_main]
use libfuzzer_sys::fuzz_target;

const MARKER: &str = "FUZZ-SECRET";

fuzz_target!(|data: &[u8]| {
    if let Err(e) = rocketchat_ratelimit_wasm::config::parse(data) {
        let text = e.to_string();
        assert!(!text.is_empty());
        let only_in_values = match serde_json::from_slice::<serde_json::Value>(data) {
            Ok(document) => in_string_values_only(&document),
            Err(_) => only_as_string_value(data, MARKER.as_bytes()),
        };
        if only_in_values {
            assert!(!text.contains(MARKER), "{text}");
        }
    }
});

/// The marker is in some string value of the tree and in no object key.
fn in_string_values_only(value: &serde_json::Value) -> bool {
    fn walk(value: &serde_json::Value, in_value: &mut bool) -> bool {
        match value {
            serde_json::Value::String(s) => {
                *in_value |= s.contains(MARKER);
                true
            }
            serde_json::Value::Array(items) => items.iter().all(|v| walk(v, in_value)),
            serde_json::Value::Object(members) => members
                .iter()
                .all(|(k, v)| !k.contains(MARKER) && walk(v, in_value)),
            _ => true,
        }
    }
    let mut in_value = false;
    walk(value, &mut in_value) && in_value
}

/// Every occurrence of `marker` is a whole JSON string (`"marker"`) standing as the value of a
/// key (`: "marker"`), never as a key.
fn only_as_string_value(data: &[u8], marker: &[u8]) -> bool {
    let mut found = false;
    for (i, w) in data.windows(marker.len()).enumerate() {
        if w != marker {
            continue;
        }
        found = true;
        let before = i.checked_sub(1).and_then(|j| data.get(j));
        let after = data.get(i + marker.len());
        if before != Some(&b'"') || after != Some(&b'"') {
            return false;
        }
        let head = data.get(..i.saturating_sub(1)).unwrap_or(&[]);
        if head.iter().rev().find(|b| !b.is_ascii_whitespace()) != Some(&b':') {
            return false;
        }
        let rest = data.get(i + marker.len() + 1..).unwrap_or(&[]);
        if rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':') {
            return false;
        }
    }
    found
}
