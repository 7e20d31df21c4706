//! The pure parts of envoyproxy/ratelimit's fixed-window counting: window length per unit, the
//! Redis key, the hits a descriptor adds, the time until the window ends, and the verdict.

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;

/// Window length in seconds for a unit (the "divider"); `None` for `UNKNOWN` or a number that
/// is no unit. The limit override's `envoy.type.v3.RateLimitUnit` uses the same numbers as the
/// response's `RateLimit.Unit`, which is how envoyproxy/ratelimit converts it too.
pub fn divider(unit: i32) -> Option<u64> {
    const DAY: u64 = 24 * 60 * 60;
    match Unit::try_from(unit).ok()? {
        Unit::Unknown => None,
        Unit::Second => Some(1),
        Unit::Minute => Some(60),
        Unit::Hour => Some(60 * 60),
        Unit::Day => Some(DAY),
        Unit::Week => Some(7 * DAY),
        Unit::Month => Some(30 * DAY),
        Unit::Year => Some(365 * DAY),
    }
}

/// Start of the window holding `now` (Unix seconds).
pub fn window_start(now: u64, divider: u64) -> u64 {
    now / divider * divider
}

/// Seconds until the window holding `now` ends: always 1..=divider.
pub fn until_reset(now: u64, divider: u64) -> u64 {
    divider - now % divider
}

/// The Redis key of a descriptor's current window, in envoyproxy/ratelimit's layout (with its
/// default empty key prefix): the domain, then every entry's key and value, each followed by
/// `_`, then the window start: `rocketchat_client_10.0.0.1_route_login_1700000040`.
pub fn cache_key(domain: &str, entries: &[Entry], divider: u64, now: u64) -> String {
    let mut key = String::with_capacity(
        domain.len()
            + 24
            + entries
                .iter()
                .map(|e| e.key.len() + e.value.len() + 2)
                .sum::<usize>(),
    );
    key.push_str(domain);
    key.push('_');
    for entry in entries {
        key.push_str(&entry.key);
        key.push('_');
        key.push_str(&entry.value);
        key.push('_');
    }
    key.push_str(&window_start(now, divider).to_string());
    key
}

/// What one descriptor adds to its counter: its own `hits_addend` when set (0 allowed: look
/// without counting), else the request's, where 0 (unset) means 1.
pub fn hits_addend(request: &RateLimitRequest, descriptor: &RateLimitDescriptor) -> u64 {
    match &descriptor.hits_addend {
        Some(own) => own.value,
        None => u64::from(request.hits_addend.max(1)),
    }
}

/// The verdict for a counter that reads `after` once this call's hits are added: over the limit
/// when `after > requests_per_unit`; the remaining count is 0 when over.
pub fn verdict(after: u64, requests_per_unit: u32) -> (bool, u32) {
    let limit = u64::from(requests_per_unit);
    if after > limit {
        (true, 0)
    } else {
        // after <= limit <= u32::MAX
        (false, (limit - after) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::UInt64Value;

    fn entry(k: &str, v: &str) -> Entry {
        Entry {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn dividers() {
        assert_eq!(divider(Unit::Second as i32), Some(1));
        assert_eq!(divider(Unit::Minute as i32), Some(60));
        assert_eq!(divider(Unit::Hour as i32), Some(3600));
        assert_eq!(divider(Unit::Day as i32), Some(86400));
        assert_eq!(divider(Unit::Week as i32), Some(604800));
        assert_eq!(divider(Unit::Month as i32), Some(2592000));
        assert_eq!(divider(Unit::Year as i32), Some(31536000));
        assert_eq!(divider(0), None);
        assert_eq!(divider(99), None);
        assert_eq!(divider(-1), None);
    }

    #[test]
    fn key_layout() {
        let entries = [
            entry("client", "10.0.0.1"),
            entry("route", "chat.postMessage"),
        ];
        assert_eq!(
            cache_key("rocketchat", &entries, 60, 1_700_000_059),
            "rocketchat_client_10.0.0.1_route_chat.postMessage_1700000040"
        );
        assert_eq!(cache_key("d", &[], 1, 17), "d_17");
        assert_eq!(cache_key("d", &[entry("k", "")], 3600, 7199), "d_k__3600");
    }

    #[test]
    fn reset_is_one_to_divider() {
        assert_eq!(until_reset(120, 60), 60);
        assert_eq!(until_reset(121, 60), 59);
        assert_eq!(until_reset(179, 60), 1);
        assert_eq!(until_reset(5, 1), 1);
    }

    #[test]
    fn hits() {
        let mut req = RateLimitRequest::default();
        let mut d = RateLimitDescriptor::default();
        assert_eq!(hits_addend(&req, &d), 1);
        req.hits_addend = 3;
        assert_eq!(hits_addend(&req, &d), 3);
        d.hits_addend = Some(UInt64Value { value: 0 });
        assert_eq!(hits_addend(&req, &d), 0);
        d.hits_addend = Some(UInt64Value { value: 7 });
        assert_eq!(hits_addend(&req, &d), 7);
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(1, 5), (false, 4));
        assert_eq!(verdict(5, 5), (false, 0));
        assert_eq!(verdict(6, 5), (true, 0));
        assert_eq!(verdict(0, 0), (false, 0));
        assert_eq!(verdict(1, 0), (true, 0));
        assert_eq!(verdict(1, u32::MAX), (false, u32::MAX - 1));
    }
}
