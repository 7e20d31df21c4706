//! Any path and method: the normal form has one spelling per route (starts with '/', no empty,
//! '.' or '..' segments, no trailing slash, no query), normal forms are left as they are, and
//! routing never panics (the route table is the shipped default plus patterns).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rocketchat_ratelimit_wasm::{config, route::normalise_path};
use std::sync::OnceLock;

fn table() -> &'static config::Config {
    static CONFIG: OnceLock<config::Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        config::parse(
            br#"{"routes":[{"path":"/api/v1/rooms/:rid/messages","rateLimiterOptions":{"numRequestsAllowed":2}},
                          {"path":"/api/v1/a/:b/:c","method":"GET","rateLimiterOptions":false}]}"#,
        )
        .unwrap_or_else(|e| panic!("fixture config: {e}"))
    })
}

fuzz_target!(|data: &[u8]| {
    let (method, path) = match data.split_first() {
        Some((m, rest)) => (
            [&b"GET"[..], b"POST", b"PUT", b"DELETE", b"OPTIONS", b"HEAD", b"X"][usize::from(*m) % 7],
            rest,
        ),
        None => (&b"GET"[..], data),
    };
    let once = normalise_path(path).into_owned();
    assert_eq!(once.first(), Some(&b'/'));
    assert!(!once.contains(&b'?') && !once.contains(&b'#'));
    if once.len() > 1 {
        assert_ne!(once.last(), Some(&b'/'));
        for segment in once[1..].split(|b| *b == b'/') {
            assert!(!segment.is_empty() && segment != b"." && segment != b"..", "{once:?}");
        }
    }
    // A normal form without escapes is already normal (no allocation on the hot path).
    if !once.contains(&b'%') {
        assert_eq!(normalise_path(&once).as_ref(), &once[..]);
    }
    let _ = table().routes.route(method, &once);
});
