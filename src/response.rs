//! Response headers and the 429 body, as Rocket.Chat writes them (SPEC §1).

/// Seconds until reset, rounded up: Rocket.Chat's `Math.ceil(msBeforeNext / 1000)`.
pub fn wait_seconds(reset_ms: u64, now_ms: u64) -> u64 {
    reset_ms.saturating_sub(now_ms).div_ceil(1000)
}

/// The 429 body, byte for byte.
pub fn too_many_requests_body(wait_s: u64) -> String {
    format!(
        "{{\"success\":false,\"error\":\"Error, too many requests. Please slow down. You must wait {wait_s} seconds before trying this endpoint again. [error-too-many-requests]\"}}"
    )
}

/// The `x-ratelimit-*` values of a counted request, added in its response phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub limit: u32,
    pub remaining: u32,
    pub reset_ms: u64,
}

impl RateLimitHeaders {
    /// Header names and values, as every counted response carries them (SPEC §1).
    pub fn values(&self) -> [(&'static str, Decimal); 3] {
        [
            ("x-ratelimit-limit", Decimal::new(u64::from(self.limit))),
            (
                "x-ratelimit-remaining",
                Decimal::new(u64::from(self.remaining)),
            ),
            ("x-ratelimit-reset", Decimal::new(self.reset_ms)),
        ]
    }
}

/// A reply the filter sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// The 429 of SPEC §1: Rocket.Chat's body, the `x-ratelimit-*` headers with remaining 0, and
/// `retry-after` (seconds, the body's N) when configured.
pub fn too_many_requests(limit: u32, reset_ms: u64, now_ms: u64, retry_after: bool) -> LocalReply {
    let wait = wait_seconds(reset_ms, now_ms);
    let mut headers = vec![("content-type", "application/json".to_string())];
    let counted = RateLimitHeaders {
        limit,
        remaining: 0,
        reset_ms,
    };
    headers.extend(
        counted
            .values()
            .iter()
            .map(|(name, value)| (*name, value.as_str().to_string())),
    );
    if retry_after {
        headers.push(("retry-after", Decimal::new(wait).as_str().to_string()));
    }
    LocalReply {
        status: 429,
        headers,
        body: too_many_requests_body(wait),
    }
}

/// Decimal digits of `n` in a stack buffer: header values without a heap allocation.
pub struct Decimal {
    buf: [u8; 20],
    start: usize,
}

impl Decimal {
    pub fn new(mut n: u64) -> Decimal {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            if let Some(d) = buf.get_mut(i) {
                *d = b'0' + (n % 10) as u8;
            }
            n /= 10;
            if n == 0 || i == 0 {
                break;
            }
        }
        Decimal { buf, start: i }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits were written.
        core::str::from_utf8(self.buf.get(self.start..).unwrap_or(&[])).unwrap_or("0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_rocketchats() {
        assert_eq!(
            too_many_requests_body(42),
            r#"{"success":false,"error":"Error, too many requests. Please slow down. You must wait 42 seconds before trying this endpoint again. [error-too-many-requests]"}"#
        );
    }

    #[test]
    fn the_429_carries_rocketchats_headers() {
        let reply = too_many_requests(10, 60_000, 1_500, true);
        assert_eq!(reply.status, 429);
        let h = |name: &str| {
            reply
                .headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("content-type"), Some("application/json"));
        assert_eq!(h("x-ratelimit-limit"), Some("10"));
        assert_eq!(h("x-ratelimit-remaining"), Some("0"));
        assert_eq!(h("x-ratelimit-reset"), Some("60000"));
        assert_eq!(h("retry-after"), Some("59"));
        assert_eq!(reply.body, too_many_requests_body(59));
        let quiet = too_many_requests(10, 60_000, 1_500, false);
        assert!(quiet.headers.iter().all(|(n, _)| *n != "retry-after"));
    }

    #[test]
    fn wait_rounds_up() {
        assert_eq!(wait_seconds(60_000, 0), 60);
        assert_eq!(wait_seconds(60_000, 1), 60);
        assert_eq!(wait_seconds(60_000, 59_001), 1);
        assert_eq!(wait_seconds(60_000, 59_000), 1);
        assert_eq!(wait_seconds(60_000, 60_000), 0);
        assert_eq!(wait_seconds(60_000, 70_000), 0);
    }

    #[test]
    fn decimal() {
        for n in [0u64, 7, 10, 1_700_000_000_000, u64::MAX] {
            assert_eq!(Decimal::new(n).as_str(), n.to_string());
        }
    }
}
