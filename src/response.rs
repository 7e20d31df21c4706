//! Response headers and the 429 body, as Rocket.Chat writes them (SPEC §1).

/// Seconds until reset, rounded up: Rocket.Chat's `Math.ceil(msBeforeNext / 1000)`.
pub fn wait_seconds(reset_ms: u64, now_ms: u64) -> u64 {
    reset_ms.saturating_sub(now_ms).div_ceil(1000)
}

/// The 429 body, byte for byte. Built by appending, not `format!`: a flood's every request
/// gets one, and the formatting machinery cost ~2k wasm instructions a body.
pub fn too_many_requests_body(wait_s: u64) -> String {
    const HEAD: &str =
        "{\"success\":false,\"error\":\"Error, too many requests. Please slow down. You must wait ";
    const TAIL: &str = " seconds before trying this endpoint again. [error-too-many-requests]\"}";
    let wait = Decimal::new(wait_s);
    let mut body = String::with_capacity(HEAD.len() + wait.as_str().len() + TAIL.len());
    body.push_str(HEAD);
    body.push_str(wait.as_str());
    body.push_str(TAIL);
    body
}

/// The `x-ratelimit-*` values of a counted request, added in its response phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub limit: u32,
    pub remaining: u32,
    pub reset_ms: u64,
    /// With `ietf_headers` (SPEC §11): `RateLimit-Policy` and `RateLimit` as well.
    pub ietf: Option<Ietf>,
}

/// What `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11) need
/// besides the limit and the remaining count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ietf {
    /// The window, ms (the policy's `w` is in whole seconds, rounded up).
    pub interval_ms: u64,
    /// Seconds until the window's reset, rounded up (`t`; the body's and `retry-after`'s N).
    pub reset_s: u64,
}

impl Ietf {
    pub fn new(interval_ms: u64, reset_ms: u64, now_ms: u64) -> Ietf {
        Ietf {
            interval_ms,
            reset_s: wait_seconds(reset_ms, now_ms),
        }
    }

    /// The policy's name: its quota and window, so that one name never stands for two
    /// different policies (`"10-per-60s"`, `"5-per-1500ms"`).
    fn name(&self, limit: u32) -> String {
        if self.interval_ms.is_multiple_of(1000) {
            format!("{limit}-per-{}s", self.interval_ms / 1000)
        } else {
            format!("{limit}-per-{}ms", self.interval_ms)
        }
    }

    /// `RateLimit-Policy: "<name>";q=<limit>;w=<window s>` and `RateLimit:
    /// "<name>";r=<remaining>;t=<seconds to reset>`: one Structured Field List (RFC 9651) item
    /// each, a String with Integer parameters. `w` must be a positive integer of seconds:
    /// a window that is not whole seconds is rounded up (a lower rate, never a higher one).
    pub fn values(&self, limit: u32, remaining: u32) -> (String, String) {
        let name = self.name(limit);
        let window_s = self.interval_ms.div_ceil(1000).max(1);
        (
            format!("\"{name}\";q={limit};w={window_s}"),
            format!("\"{name}\";r={remaining};t={}", self.reset_s),
        )
    }
}

impl RateLimitHeaders {
    /// Every rate-limit header of a counted response, the 429 included (SPEC §1, §11), by
    /// name and value.
    pub fn each(&self, header: impl FnMut(&'static str, &str)) {
        self.each_cached(&mut Formatted::default(), header);
    }

    /// [`each`](Self::each), reusing the limit and reset values `cache` formatted last time
    /// when they are the same (a VM's requests mostly share both: one route's limit, one
    /// window's end), so that a counted response formats only its remaining count.
    pub fn each_cached(&self, cache: &mut Formatted, mut header: impl FnMut(&'static str, &str)) {
        header("x-ratelimit-limit", cache.limit(self.limit));
        header(
            "x-ratelimit-remaining",
            Decimal::new(u64::from(self.remaining)).as_str(),
        );
        header("x-ratelimit-reset", cache.reset(self.reset_ms));
        if let Some(ietf) = &self.ietf {
            let (policy, current) = ietf.values(self.limit, self.remaining);
            header("ratelimit-policy", &policy);
            header("ratelimit", &current);
        }
    }
}

/// The limit and reset values last formatted (see [`RateLimitHeaders::each_cached`]).
#[derive(Default)]
pub struct Formatted {
    limit: Option<(u32, Decimal)>,
    reset: Option<(u64, Decimal)>,
}

impl Formatted {
    fn limit(&mut self, limit: u32) -> &str {
        match &mut self.limit {
            Some((n, _)) if *n == limit => {}
            slot => *slot = Some((limit, Decimal::new(u64::from(limit)))),
        }
        self.limit.as_ref().map_or("", |(_, d)| d.as_str())
    }

    fn reset(&mut self, reset_ms: u64) -> &str {
        match &mut self.reset {
            Some((n, _)) if *n == reset_ms => {}
            slot => *slot = Some((reset_ms, Decimal::new(reset_ms))),
        }
        self.reset.as_ref().map_or("", |(_, d)| d.as_str())
    }
}

/// A reply the filter sends itself instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u32,
    pub headers: Vec<(&'static str, Value)>,
    pub body: String,
}

/// A header value of a local reply: mostly a constant or a number, which need no allocation
/// (a flood's every request gets a 429). Equal when the text is.
#[derive(Debug, Clone, Eq)]
pub enum Value {
    Static(&'static str),
    Digits(Decimal),
    Text(String),
}

impl Value {
    pub fn as_str(&self) -> &str {
        match self {
            Value::Static(s) => s,
            Value::Digits(d) => d.as_str(),
            Value::Text(s) => s,
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl AsRef<[u8]> for Value {
    fn as_ref(&self) -> &[u8] {
        self.as_str().as_bytes()
    }
}

/// The 429 of SPEC §1: Rocket.Chat's body, the rate-limit headers with remaining 0 (`ietf`:
/// the IETF ones too, SPEC §11), and `retry-after` (seconds, the body's N) when configured.
pub fn too_many_requests(
    limit: u32,
    reset_ms: u64,
    now_ms: u64,
    retry_after: bool,
    ietf: Option<Ietf>,
) -> LocalReply {
    let wait = wait_seconds(reset_ms, now_ms);
    let mut headers = Vec::with_capacity(7);
    headers.push(("content-type", Value::Static("application/json")));
    // The headers of RateLimitHeaders::each, with remaining 0, in its order.
    headers.push((
        "x-ratelimit-limit",
        Value::Digits(Decimal::new(u64::from(limit))),
    ));
    headers.push(("x-ratelimit-remaining", Value::Static("0")));
    headers.push(("x-ratelimit-reset", Value::Digits(Decimal::new(reset_ms))));
    if let Some(ietf) = ietf {
        let (policy, current) = ietf.values(limit, 0);
        headers.push(("ratelimit-policy", Value::Text(policy)));
        headers.push(("ratelimit", Value::Text(current)));
    }
    if retry_after {
        headers.push(("retry-after", Value::Digits(Decimal::new(wait))));
    }
    LocalReply {
        status: 429,
        headers,
        body: too_many_requests_body(wait),
    }
}

/// SPEC §11 `https_only_login`: the answer to a request that would have sent a password or a
/// login token over plain HTTP. 403, not 401 (Rocket.Chat's clients take a 401 for "logged
/// out" and may drop their session) and not a redirect (the credential has already crossed the
/// network in clear; a 307/308 would have the client send it again and hide the mistake).
pub fn https_required() -> LocalReply {
    LocalReply {
        status: 403,
        headers: vec![("content-type", Value::Static("application/json"))],
        body: HTTPS_REQUIRED_BODY.to_string(),
    }
}

/// The body of [`https_required`], in Rocket.Chat's error shape (a `Meteor.Error` as its API
/// writes one: the reason, the error type in brackets, and `errorType`).
pub const HTTPS_REQUIRED_BODY: &str = "{\"success\":false,\"error\":\"HTTPS is required: this request carries a password or a login token and reached the server over plain HTTP, so it was refused and not forwarded. Use https:// to connect. [error-https-required]\",\"errorType\":\"error-https-required\"}";

/// Decimal digits of `n` in a stack buffer: header values without a heap allocation.
#[derive(Debug, Clone, Copy)]
pub struct Decimal {
    buf: [u8; 20],
    start: usize,
}

/// "00" to "99": two digits per division.
const DIGIT_PAIRS: &[u8; 200] = b"\
0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

impl PartialEq for Decimal {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Decimal {}

impl Decimal {
    /// On the request path (three headers a request, a 429's body): a 64-bit division is
    /// costly in a wasm engine, so a number above `u32::MAX` (a reset time in ms) takes two
    /// of them at most, and the rest is 32-bit, two digits at a time.
    pub fn new(n: u64) -> Decimal {
        let mut buf = [0u8; 20];
        let mut end = buf.len();
        let mut n = n;
        while n > u64::from(u32::MAX) {
            let low = (n % 100_000_000) as u32;
            n /= 100_000_000;
            end = Self::write_u32(&mut buf, end, low, 8);
        }
        let start = Self::write_u32(&mut buf, end, n as u32, 1);
        Decimal { buf, start }
    }

    /// Writes `n` right-aligned before `end`, at least `min_digits` digits (zero-padded);
    /// returns where it starts.
    fn write_u32(buf: &mut [u8; 20], end: usize, mut n: u32, min_digits: usize) -> usize {
        let mut i = end;
        while n >= 100 {
            let pair = (n % 100) as usize * 2;
            n /= 100;
            i = i.saturating_sub(2);
            if let (Some(d), Some(p)) = (buf.get_mut(i..i + 2), DIGIT_PAIRS.get(pair..pair + 2)) {
                d.copy_from_slice(p);
            }
        }
        if n >= 10 {
            let pair = n as usize * 2;
            i = i.saturating_sub(2);
            if let (Some(d), Some(p)) = (buf.get_mut(i..i + 2), DIGIT_PAIRS.get(pair..pair + 2)) {
                d.copy_from_slice(p);
            }
        } else {
            i = i.saturating_sub(1);
            if let Some(d) = buf.get_mut(i) {
                *d = b'0' + n as u8;
            }
        }
        while end - i < min_digits && i > 0 {
            i -= 1;
            if let Some(d) = buf.get_mut(i) {
                *d = b'0';
            }
        }
        i
    }

    pub fn as_str(&self) -> &str {
        let digits = self.buf.get(self.start..).unwrap_or(&[]);
        // SAFETY: `new` writes only ASCII digits (b'0'..=b'9') from `start` on, and nothing
        // else changes `buf`: valid UTF-8. Checking it again cost ~150 wasm instructions per
        // header, on every counted request (three headers, and the counter key).
        unsafe { core::str::from_utf8_unchecked(digits) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
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
        let reply = too_many_requests(10, 60_000, 1_500, true, None);
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
        let quiet = too_many_requests(10, 60_000, 1_500, false, None);
        assert!(quiet.headers.iter().all(|(n, _)| *n != "retry-after"));
        assert!(h("ratelimit").is_none() && h("ratelimit-policy").is_none());
    }

    /// SPEC §11: draft-ietf-httpapi-ratelimit-headers-11, on passes and on the 429.
    #[test]
    fn ietf_headers() {
        let ietf = Ietf::new(60_000, 60_000, 1_500);
        let reply = too_many_requests(10, 60_000, 1_500, true, Some(ietf));
        let h = |name: &str| {
            reply
                .headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(h("ratelimit-policy"), Some("\"10-per-60s\";q=10;w=60"));
        assert_eq!(h("ratelimit"), Some("\"10-per-60s\";r=0;t=59"));
        assert_eq!(h("retry-after"), Some("59"));

        let mut seen = Vec::new();
        let pass = RateLimitHeaders {
            limit: 5,
            remaining: 3,
            reset_ms: 11_500,
            ietf: Some(Ietf::new(1_500, 11_500, 10_001)),
        };
        pass.each(|n, v| seen.push((n, v.to_string())));
        assert_eq!(
            seen,
            [
                ("x-ratelimit-limit", "5".to_string()),
                ("x-ratelimit-remaining", "3".to_string()),
                ("x-ratelimit-reset", "11500".to_string()),
                ("ratelimit-policy", "\"5-per-1500ms\";q=5;w=2".to_string()),
                ("ratelimit", "\"5-per-1500ms\";r=3;t=2".to_string()),
            ]
        );
        // A window shorter than a second is one second; a reset now is t=0.
        assert_eq!(
            Ietf::new(250, 1_000, 1_000).values(1, 0),
            (
                "\"1-per-250ms\";q=1;w=1".to_string(),
                "\"1-per-250ms\";r=0;t=0".to_string()
            )
        );
    }

    #[test]
    fn https_required_is_rocketchats_error_shape() {
        let reply = https_required();
        assert_eq!(reply.status, 403);
        assert_eq!(
            reply.headers,
            [("content-type", Value::Static("application/json"))]
        );
        let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(body["success"], false);
        assert_eq!(body["errorType"], "error-https-required");
        assert!(reply
            .body
            .starts_with("{\"success\":false,\"error\":\"HTTPS is required"));
        assert!(reply
            .body
            .ends_with("[error-https-required]\",\"errorType\":\"error-https-required\"}"));
    }

    #[test]
    fn the_429_has_the_counted_headers_in_their_order() {
        for ietf in [None, Some(Ietf::new(60_000, 60_000, 1_500))] {
            let reply = too_many_requests(10, 60_000, 1_500, true, ietf);
            let mut counted = vec![("content-type".to_string(), "application/json".to_string())];
            let h = RateLimitHeaders {
                limit: 10,
                remaining: 0,
                reset_ms: 60_000,
                ietf,
            };
            h.each(|n, v| counted.push((n.to_string(), v.to_string())));
            counted.push(("retry-after".to_string(), "59".to_string()));
            let got: Vec<_> = reply
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_str().to_string()))
                .collect();
            assert_eq!(got, counted);
        }
    }

    #[test]
    fn cached_limit_and_reset_follow_their_values() {
        let mut cache = Formatted::default();
        let mut values = |limit, remaining, reset_ms| {
            let mut seen = Vec::new();
            let h = RateLimitHeaders {
                limit,
                remaining,
                reset_ms,
                ietf: None,
            };
            h.each_cached(&mut cache, |_, v| seen.push(v.to_string()));
            seen
        };
        assert_eq!(values(10, 9, 60_000), ["10", "9", "60000"]);
        assert_eq!(values(10, 8, 60_000), ["10", "8", "60000"]);
        assert_eq!(values(5, 4, 60_000), ["5", "4", "60000"]);
        assert_eq!(values(5, 4, 1_700_000_060_000), ["5", "4", "1700000060000"]);
        assert_eq!(values(10, 0, 60_000), ["10", "0", "60000"]);
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
        let mut edges = vec![0u64, 7, 10, 99, 100, 101, 1_700_000_000_000, u64::MAX];
        for p in 1..20 {
            let t = 10u64.pow(p);
            edges.extend([t - 1, t, t + 1]);
        }
        edges.extend([
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            100_000_000 * 42 + 7,
        ]);
        for n in edges {
            assert_eq!(Decimal::new(n).as_str(), n.to_string());
        }
    }
}
