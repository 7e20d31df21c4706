//! Any callout answer (status, body), any cached slot bytes and any serialized header map:
//! never a panic, a `me` answer only yields roles for a 200 naming the caller, and the
//! permission's roles only come from a 200 and can be stored joined by newlines.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rocketchat_ratelimit_wasm::bypass::{self, MeAnswer, SharedRoles};

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data.split_first() {
        Some((s, rest)) => (
            [None, Some(200u16), Some(401), Some(500), Some(204)][usize::from(*s) % 5],
            rest,
        ),
        None => (None, data),
    };
    if let MeAnswer::Roles(_) = bypass::parse_me(status, body, b"u1") {
        assert_eq!(status, Some(200));
    }
    if let Some(roles) = bypass::parse_permissions(status, body, "api-bypass-rate-limit") {
        assert_eq!(status, Some(200));
        // Roles are shared joined by '\n': never an empty one, never one with a newline.
        assert!(roles.iter().all(|r| !r.is_empty() && !r.contains('\n')), "{roles:?}");
    }
    let _ = bypass::read_slot(body, 42, 1000);
    let _ = bypass::may_store_answer(body, 42, 1000);
    let _ = rocketchat_ratelimit_wasm::headers::find(body, [":method", ":path", "x-user-id", "x-auth-token"]);
    let shared = SharedRoles::decode(body);
    let _ = SharedRoles::decode(&shared.encode());
});
