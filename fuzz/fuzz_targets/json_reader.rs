//! The filter's own JSON reader against serde_json, the reference: for any bytes, both accept
//! or both refuse, and what both accept reads the same (strings, numbers that fit an integer,
//! arrays, objects with serde_json's "last duplicate wins"). serde_json is a dependency of this
//! fuzz crate only; the filter does not link it.
//!
//! Known, intended differences, excluded from the comparison:
//! - a number out of f64 range (`1e400`): serde_json refuses it; the reader keeps the text and
//!   lets the caller judge it (a limit of `1e400` is then "must be a positive integer").
#![no_main]
use libfuzzer_sys::fuzz_target;
use rocketchat_ratelimit_wasm::json::{self, Value};

fuzz_target!(|data: &[u8]| {
    let ours = json::parse(data);
    let reference = serde_json::from_slice::<serde_json::Value>(data);
    match (&ours, &reference) {
        (Ok(a), Ok(b)) => assert_same(a, b),
        (Err(_), Err(_)) => {}
        (Ok(a), Err(e)) => {
            assert!(
                e.to_string().starts_with("number out of range") && has_huge_number(a),
                "reader accepted what serde_json refused ({e}): {:?}",
                String::from_utf8_lossy(data)
            );
        }
        (Err(e), Ok(_)) => panic!(
            "reader refused ({e}) what serde_json accepted: {:?}",
            String::from_utf8_lossy(data)
        ),
    }
});

fn has_huge_number(v: &Value) -> bool {
    match v {
        Value::Number(text) => text.parse::<f64>().map_or(true, |f| f.is_infinite()),
        Value::Array(items) => items.iter().any(has_huge_number),
        Value::Object(members) => members.iter().any(|(_, v)| has_huge_number(v)),
        _ => false,
    }
}

fn assert_same(ours: &Value, reference: &serde_json::Value) {
    match (ours, reference) {
        (Value::Null, serde_json::Value::Null) => {}
        (Value::Bool(a), serde_json::Value::Bool(b)) => assert_eq!(a, b),
        (Value::String(a), serde_json::Value::String(b)) => assert_eq!(a, b),
        (Value::Number(text), serde_json::Value::Number(n)) => {
            // The filter only ever reads numbers as u64 (`as_u64`); the rest is compared as
            // the value serde_json found (`-0` is a float there).
            if let Some(u) = ours.as_u64() {
                assert_eq!(Some(u), n.as_u64(), "{text}");
            } else if let Some(i) = n.as_i64() {
                assert_eq!(text.parse::<i64>().ok(), Some(i), "{text}");
            } else if let (Ok(a), Some(b)) = (text.parse::<f64>(), n.as_f64()) {
                // serde_json (without float_roundtrip) may be a few ulps off.
                assert!(a == b || ((a - b) / a).abs() < 1e-12, "{text} vs {n}");
            }
        }
        (Value::Array(a), serde_json::Value::Array(b)) => {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert_same(x, y);
            }
        }
        (Value::Object(members), serde_json::Value::Object(map)) => {
            // serde_json keeps the last of duplicate keys.
            let mut last: Vec<(&str, &Value)> = Vec::new();
            for (k, v) in members {
                last.retain(|(seen, _)| *seen != k.as_str());
                last.push((k, v));
            }
            assert_eq!(last.len(), map.len());
            for (k, v) in last {
                assert_same(v, &map[k]);
            }
        }
        (a, b) => panic!("different kinds: {a:?} vs {b:?}"),
    }
}
