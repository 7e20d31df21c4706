//! Envoy's Rate Limit Service protocol, v3 (`envoy.service.ratelimit.v3.RateLimitService/
//! ShouldRateLimit`): the request the filter sends and the parts of the answer it reads,
//! encoded and decoded by hand (SPEC §10).
//!
//! Four small messages do not earn a protobuf code generator in the `.wasm`. The encoding is
//! checked against the generated types of the `envoy-types` crate in the reference engine's
//! tests (`tools/ratelimit-engine`), both ways. The decoder skips every field it does not
//! read, never panics, and refuses what is not well-formed protobuf.
//!
//! ```text
//! RateLimitRequest    { string domain = 1; repeated RateLimitDescriptor descriptors = 2;
//!                       uint32 hits_addend = 3; }
//! RateLimitDescriptor { repeated Entry entries = 1; RateLimitOverride limit = 2; }
//!   Entry             { string key = 1; string value = 2; }
//!   RateLimitOverride { uint32 requests_per_unit = 1; RateLimitUnit unit = 2; }
//! RateLimitResponse   { Code overall_code = 1; repeated DescriptorStatus statuses = 2; ... }
//!   DescriptorStatus  { Code code = 1; RateLimit current_limit = 2;
//!                       uint32 limit_remaining = 3; Duration duration_until_reset = 4; }
//! ```

pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// `envoy.type.v3.RateLimitUnit` (the override's unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
}

impl Unit {
    pub const ALL: [Unit; 4] = [Unit::Second, Unit::Minute, Unit::Hour, Unit::Day];

    pub fn millis(self) -> u64 {
        match self {
            Unit::Second => 1_000,
            Unit::Minute => 60_000,
            Unit::Hour => 3_600_000,
            Unit::Day => 86_400_000,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
        }
    }
}

/// The override unit for the filter's window `[start_ms, start_ms + interval_ms)`: the
/// smallest unit whose clock-aligned window (the engine counts in those) holds the whole
/// filter window, so that one filter window is one engine key. Every interval that divides
/// a day (all of Rocket.Chat's) always finds one; any other interval falls back to a day,
/// and its one window a day that straddles midnight UTC is counted in two engine keys.
pub fn unit_for_window(start_ms: u64, interval_ms: u64) -> Unit {
    let last_ms = start_ms.saturating_add(interval_ms.saturating_sub(1));
    Unit::ALL
        .into_iter()
        .find(|u| start_ms / u.millis() == last_ms / u.millis())
        .unwrap_or(Unit::Day)
}

/// `RateLimitResponse.Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    fn from_wire(v: u64) -> Code {
        match v {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
}

/// One descriptor status of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub limit_remaining: u32,
    /// `current_limit.requests_per_unit`, when the engine set it.
    pub requests_per_unit: Option<u32>,
}

/// The parts of a `RateLimitResponse` the filter reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub overall: Code,
    pub statuses: Vec<Status>,
}

/// One descriptor of a request: its entries (key, value) and its limit override.
pub struct Descriptor<'a> {
    pub entries: &'a [(&'a str, &'a str)],
    pub requests_per_unit: u32,
    pub unit: Unit,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_tag(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_tag(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_uint(out: &mut Vec<u8>, field: u32, v: u64) {
    // proto3: a zero scalar is not written.
    if v != 0 {
        put_tag(out, field, 0);
        put_varint(out, v);
    }
}

/// Encodes a `RateLimitRequest` with one descriptor (hits_addend 1).
pub fn encode_request(domain: &str, descriptor: &Descriptor<'_>) -> Vec<u8> {
    let mut d = Vec::with_capacity(160);
    for (key, value) in descriptor.entries {
        let mut entry = Vec::with_capacity(key.len() + value.len() + 4);
        put_bytes(&mut entry, 1, key.as_bytes());
        put_bytes(&mut entry, 2, value.as_bytes());
        put_bytes(&mut d, 1, &entry);
    }
    let mut limit = Vec::with_capacity(8);
    put_uint(&mut limit, 1, u64::from(descriptor.requests_per_unit));
    put_uint(&mut limit, 2, descriptor.unit as u64);
    put_bytes(&mut d, 2, &limit);
    let mut out = Vec::with_capacity(d.len() + domain.len() + 8);
    put_bytes(&mut out, 1, domain.as_bytes());
    put_bytes(&mut out, 2, &d);
    put_uint(&mut out, 3, 1);
    out
}

/// A protobuf reader over one message: (field, value) pairs, `None` on anything malformed.
struct Fields<'a> {
    bytes: &'a [u8],
    malformed: bool,
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (first, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= u64::from(first & 0x7f) << shift;
        if first & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if bytes.len() < n {
        return None;
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Some(head)
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Fields<'a> {
        Fields {
            bytes,
            malformed: false,
        }
    }

    fn read(&mut self) -> Option<(u64, Value<'a>)> {
        let tag = take_varint(&mut self.bytes)?;
        let value = match tag & 7 {
            0 => Value::Varint(take_varint(&mut self.bytes)?),
            1 => take(&mut self.bytes, 8).map(|_| Value::Fixed)?,
            2 => {
                let len = usize::try_from(take_varint(&mut self.bytes)?).ok()?;
                Value::Bytes(take(&mut self.bytes, len)?)
            }
            5 => take(&mut self.bytes, 4).map(|_| Value::Fixed)?,
            _ => return None,
        };
        Some((tag >> 3, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = (u64, Value<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.bytes.is_empty() || self.malformed {
            return None;
        }
        let item = self.read();
        if item.is_none() {
            self.malformed = true;
        }
        item
    }
}

fn decode_status(bytes: &[u8]) -> Option<Status> {
    let mut status = Status {
        code: Code::Unknown,
        limit_remaining: 0,
        requests_per_unit: None,
    };
    let mut fields = Fields::new(bytes);
    for (field, value) in fields.by_ref() {
        match (field, value) {
            (1, Value::Varint(v)) => status.code = Code::from_wire(v),
            (2, Value::Bytes(limit)) => {
                let mut inner = Fields::new(limit);
                for (f, v) in inner.by_ref() {
                    if let (1, Value::Varint(n)) = (f, v) {
                        status.requests_per_unit = Some(u32::try_from(n).unwrap_or(u32::MAX));
                    }
                }
                if inner.malformed {
                    return None;
                }
            }
            (3, Value::Varint(v)) => status.limit_remaining = u32::try_from(v).unwrap_or(u32::MAX),
            // A known field with the wrong wire type is not the message we asked for.
            (1 | 3, _) | (2, Value::Varint(_) | Value::Fixed) => return None,
            _ => {}
        }
    }
    (!fields.malformed).then_some(status)
}

/// Decodes a `RateLimitResponse`; `None` if the bytes are not one.
pub fn decode_answer(bytes: &[u8]) -> Option<Answer> {
    let mut answer = Answer {
        overall: Code::Unknown,
        statuses: Vec::new(),
    };
    let mut fields = Fields::new(bytes);
    for (field, value) in fields.by_ref() {
        match (field, value) {
            (1, Value::Varint(v)) => answer.overall = Code::from_wire(v),
            (2, Value::Bytes(status)) => answer.statuses.push(decode_status(status)?),
            (1, _) | (2, _) => return None,
            _ => {}
        }
    }
    (!fields.malformed).then_some(answer)
}

/// Writes `bytes` as a descriptor value: protobuf strings must be UTF-8 and a client's path
/// need not be, so every byte outside printable ASCII, and `%` itself, is written `%XX`. The
/// mapping is one-to-one: distinct buckets stay distinct at the engine.
pub fn escape_value(bytes: &[u8], out: &mut String) {
    let hex = |nibble: u8| char::from_digit(u32::from(nibble), 16).map(|c| c.to_ascii_uppercase());
    for &b in bytes {
        if (0x21..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.extend(hex(b >> 4));
            out.extend(hex(b & 15));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn units_hold_the_whole_filter_window() {
        // 1 s, 3 s, 5 s, 10 s, 60 s windows (the preset's) in the smallest unit that holds them.
        assert_eq!(unit_for_window(1_700_000_001_000, 1_000), Unit::Second);
        assert_eq!(unit_for_window(1_700_000_001_000, 3_000), Unit::Minute);
        assert_eq!(unit_for_window(1_700_000_040_000, 10_000), Unit::Minute);
        assert_eq!(unit_for_window(1_700_000_040_000, 60_000), Unit::Minute);
        assert_eq!(unit_for_window(1_699_999_200_000, 3_600_000), Unit::Hour);
        assert_eq!(unit_for_window(1_699_920_000_000, 86_400_000), Unit::Day);
        // 7 s does not divide a minute: a window crossing a minute boundary needs an hour.
        assert_eq!(unit_for_window(56_000, 7_000), Unit::Hour);
        assert_eq!(unit_for_window(49_000, 7_000), Unit::Minute);
        // No unit holds a window that crosses midnight: a day, as documented.
        assert_eq!(unit_for_window(86_400_000 - 3_000, 7_000), Unit::Day);
    }

    #[test]
    fn request_bytes_are_protobuf() {
        let entries = [("remote_address", "10.0.0.1"), ("window", "60000")];
        let bytes = encode_request(
            "rc",
            &Descriptor {
                entries: &entries,
                requests_per_unit: 10,
                unit: Unit::Minute,
            },
        );
        let mut expected = vec![0x0a, 2, b'r', b'c', 0x12];
        let e1: Vec<u8> = [&[0x0a, 14][..], b"remote_address", &[0x12, 8], b"10.0.0.1"].concat();
        let e2: Vec<u8> = [&[0x0a, 6][..], b"window", &[0x12, 5], b"60000"].concat();
        let limit = [0x12, 4, 0x08, 10, 0x10, 2];
        let d: Vec<u8> = [
            &[0x0a, e1.len() as u8][..],
            &e1,
            &[0x0a, e2.len() as u8],
            &e2,
            &limit,
        ]
        .concat();
        expected.push(d.len() as u8);
        expected.extend_from_slice(&d);
        expected.extend_from_slice(&[0x18, 1]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn answers_are_read_and_garbage_is_refused() {
        // overall OVER_LIMIT; status {code OK, current_limit {10, MINUTE}, remaining 3,
        // duration {seconds 5}}, then an unknown field and a fixed64.
        let status = [
            0x08, 1, 0x12, 4, 0x08, 10, 0x10, 2, 0x18, 3, 0x22, 2, 0x08, 5,
        ];
        let mut bytes = vec![0x08, 2, 0x12, status.len() as u8];
        bytes.extend_from_slice(&status);
        bytes.extend_from_slice(&[0x2a, 1, b'x', 0x39, 1, 2, 3, 4, 5, 6, 7, 8]);
        let answer = decode_answer(&bytes).unwrap();
        assert_eq!(answer.overall, Code::OverLimit);
        assert_eq!(
            answer.statuses,
            vec![Status {
                code: Code::Ok,
                limit_remaining: 3,
                requests_per_unit: Some(10)
            }]
        );
        assert_eq!(
            decode_answer(&[]),
            Some(Answer {
                overall: Code::Unknown,
                statuses: vec![]
            })
        );
        for cut in 1..bytes.len() {
            let _ = decode_answer(&bytes[..cut]);
        }
        assert_eq!(decode_answer(&[0x12, 50, 1]), None);
        assert_eq!(decode_answer(&[0x0a, 1, 1]), None); // overall_code as bytes
        assert_eq!(decode_answer(&[0x0f]), None); // wire type 7
        assert_eq!(
            decode_answer(&[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]),
            None
        );
        assert_eq!(decode_answer(b"<html>"), None);
    }

    #[test]
    fn escaped_values_are_utf8_and_one_to_one() {
        let mut a = String::new();
        escape_value(b"/api/v1/x y%2F\xff", &mut a);
        assert_eq!(a, "/api/v1/x%20y%252F%FF");
        let mut b = String::new();
        escape_value(b"/api/v1/x%20y%2F\xff", &mut b);
        assert_ne!(a, b);
    }
}
