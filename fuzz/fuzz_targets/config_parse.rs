//! Any bytes as a plugin configuration: an error or a config, never a panic; and an error
//! never echoes a string *value* (it could be a token). Field names are echoed on purpose
//! (`unknown field ...`), so the check applies when the marker only ever stands as a value.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = rocketchat_ratelimit_wasm::config::parse(data) {
        let text = e.to_string();
        assert!(!text.is_empty());
        if only_as_string_value(data, b"FUZZ-SECRET") {
            assert!(!text.contains("FUZZ-SECRET"), "{text}");
        }
    }
});

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
