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
