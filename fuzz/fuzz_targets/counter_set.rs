//! Any stored set value and any request: deciding never panics, a pass never reports more
//! remaining than the limit allows, and what is written decodes to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rocketchat_ratelimit_wasm::limiter::Limit;
use rocketchat_ratelimit_wasm::limiter::{decide, Set, Verdict};

fuzz_target!(|data: &[u8]| {
    if data.len() < 20 {
        return;
    }
    let (head, stored) = data.split_at(20);
    let word = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or([0; 8]));
    let fingerprint = word(0);
    let now_ms = word(8) % (1 << 45);
    let requests = u32::from_le_bytes(head[16..20].try_into().unwrap_or([0; 4])).max(1);
    let Some(limit) = Limit::new(requests, 1 + (fingerprint >> 40) % 86_400_000) else { return };
    let set = Set::decode(stored);
    let d = decide(&set, fingerprint, limit, now_ms);
    if let Verdict::Allowed { remaining, .. } = d.verdict {
        assert!(remaining < limit.requests.get());
    }
    if let Some(next) = d.write {
        assert_eq!(Set::decode(&next.encode()), next);
    }
});
