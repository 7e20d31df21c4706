//! Client identity (SPEC §4.1, §11): Envoy's downstream remote address, port removed, masked
//! to the configured prefix (`client_ipv4_prefix`, `client_ipv6_prefix`), so that one host
//! spraying the addresses of its own IPv6 /64 is one client.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The prefix lengths a client address is masked to (SPEC §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefixes {
    /// 1..=32.
    pub v4: u8,
    /// 1..=128.
    pub v6: u8,
}

impl Default for Prefixes {
    /// IPv4 /32 (one address, one client) and IPv6 /64 (one subnet, one client: a host is
    /// routinely given a whole /64, and picking a new address in it costs nothing).
    fn default() -> Self {
        Prefixes { v4: 32, v6: 64 }
    }
}

/// The client of a request: [`client_ip`] masked to `prefixes`. A whole address (IPv4 /32,
/// IPv6 /128) is written as Envoy wrote it; a prefix as its network address and length, e.g.
/// `2001:db8:1:2::/64` or `10.1.2.0/24` (this is the `client` the Rate Limit Service sees).
/// Anything that is not an IP address (a Unix socket peer) is used as it is.
pub fn client_id(source_address: &[u8], prefixes: Prefixes) -> Cow<'_, [u8]> {
    let ip = client_ip(source_address);
    if !ip.contains(&b':') {
        // IPv4, the common case: the default /32 needs no parsing at all.
        if prefixes.v4 >= 32 {
            return Cow::Borrowed(ip);
        }
        return match parse::<Ipv4Addr>(ip) {
            Some(addr) => {
                let bits = u32::from(addr) & mask32(prefixes.v4);
                Cow::Owned(format!("{}/{}", Ipv4Addr::from(bits), prefixes.v4).into_bytes())
            }
            None => Cow::Borrowed(ip),
        };
    }
    if prefixes.v6 >= 128 {
        return Cow::Borrowed(ip);
    }
    match parse::<Ipv6Addr>(ip) {
        // IPv4-mapped in hex (`::ffff:a00:7`; Envoy writes the dotted form, handled above).
        Some(addr) if addr.to_ipv4_mapped().is_some() => {
            let v4 = u32::from(addr.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED));
            let bits = v4 & mask32(prefixes.v4);
            let text = if prefixes.v4 >= 32 {
                Ipv4Addr::from(bits).to_string()
            } else {
                format!("{}/{}", Ipv4Addr::from(bits), prefixes.v4)
            };
            Cow::Owned(text.into_bytes())
        }
        Some(addr) => {
            let bits = u128::from(addr) & mask128(prefixes.v6);
            Cow::Owned(format!("{}/{}", Ipv6Addr::from(bits), prefixes.v6).into_bytes())
        }
        None => Cow::Borrowed(ip),
    }
}

fn parse<T: std::str::FromStr>(text: &[u8]) -> Option<T> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// The network mask of a /`len` IPv4 prefix (`len` 0..=32).
fn mask32(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

/// The network mask of a /`len` IPv6 prefix (`len` 0..=128).
fn mask128(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

/// The client IP from Envoy's `source.address` property: `1.2.3.4:5678`, `[::1]:5678`, or
/// `[::ffff:1.2.3.4]:80` (IPv4-mapped, written as IPv4). Anything unexpected is used as it is:
/// it still identifies the connection's peer, and it never panics.
pub fn client_ip(source_address: &[u8]) -> &[u8] {
    if let Some(rest) = source_address.strip_prefix(b"[") {
        let inner = match rest.iter().position(|b| *b == b']') {
            Some(end) => rest.get(..end).unwrap_or(rest),
            None => rest,
        };
        return strip_v4_mapped(inner);
    }
    // IPv4 "a.b.c.d:port": cut at the only colon. More than one colon and no brackets: a bare
    // IPv6 address without port; keep it whole.
    let colons = source_address.iter().filter(|b| **b == b':').count();
    if colons == 1 {
        if let Some(cut) = source_address.iter().position(|b| *b == b':') {
            return source_address.get(..cut).unwrap_or(source_address);
        }
    }
    strip_v4_mapped(source_address)
}

fn strip_v4_mapped(addr: &[u8]) -> &[u8] {
    const PREFIX: &[u8] = b"::ffff:";
    match addr.get(..PREFIX.len()) {
        Some(p) if p.eq_ignore_ascii_case(PREFIX) => {
            let rest = addr.get(PREFIX.len()..).unwrap_or(addr);
            if rest.contains(&b'.') {
                rest
            } else {
                addr
            }
        }
        _ => addr,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn forms_of_source_address() {
        let cases: [(&[u8], &[u8]); 9] = [
            (b"10.1.2.3:5555", b"10.1.2.3"),
            (b"[::1]:80", b"::1"),
            (b"[2001:db8::5]:443", b"2001:db8::5"),
            (b"[::ffff:10.0.0.7]:80", b"10.0.0.7"),
            (b"[::FFFF:10.0.0.7]:80", b"10.0.0.7"),
            (b"::ffff:10.0.0.8", b"10.0.0.8"),
            (b"2001:db8::1", b"2001:db8::1"),
            (b"", b""),
            (b"[unterminated", b"unterminated"),
        ];
        for (input, want) in cases {
            assert_eq!(
                client_ip(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    fn id(source: &str, v4: u8, v6: u8) -> String {
        String::from_utf8(client_id(source.as_bytes(), Prefixes { v4, v6 }).into_owned()).unwrap()
    }

    #[test]
    fn addresses_are_masked_to_their_prefix() {
        let cases = [
            // The defaults: IPv4 whole, IPv6 to its /64.
            ("10.1.2.3:5555", 32, 64, "10.1.2.3"),
            (
                "[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443",
                32,
                64,
                "2001:db8:1:2::/64",
            ),
            ("[2001:db8:1:2::1]:0", 32, 64, "2001:db8:1:2::/64"),
            ("[2001:db8:1:3::1]:0", 32, 64, "2001:db8:1:3::/64"),
            ("[::ffff:10.0.0.7]:80", 32, 64, "10.0.0.7"),
            ("[::1]:80", 32, 64, "::/64"),
            ("[::ffff:a00:7]:80", 32, 64, "10.0.0.7"),
            ("[::ffff:a00:7]:80", 24, 64, "10.0.0.0/24"),
            // Other prefixes.
            ("10.1.2.3:5555", 24, 64, "10.1.2.0/24"),
            ("10.1.2.3:5555", 1, 64, "0.0.0.0/1"),
            ("200.1.2.3:5555", 1, 64, "128.0.0.0/1"),
            ("[::ffff:10.0.0.7]:80", 16, 64, "10.0.0.0/16"),
            (
                "[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443",
                32,
                128,
                "2001:db8:1:2:aaaa:bbbb:cccc:dddd",
            ),
            (
                "[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443",
                32,
                127,
                "2001:db8:1:2:aaaa:bbbb:cccc:dddc/127",
            ),
            (
                "[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443",
                32,
                48,
                "2001:db8:1::/48",
            ),
            ("[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443", 32, 1, "::/1"),
            ("[fe80::1]:443", 32, 1, "8000::/1"),
            // Not an address: used as it is, never a panic.
            ("unix:/var/run/envoy.sock", 24, 64, "unix"),
            ("", 24, 64, ""),
            ("[zz::1]:1", 32, 64, "zz::1"),
            ("300.1.2.3:1", 24, 64, "300.1.2.3"),
        ];
        for (source, v4, v6, want) in cases {
            assert_eq!(id(source, v4, v6), want, "{source} /{v4} /{v6}");
        }
        // Every address of one /64 is one client; the next /64 is another.
        let a = id("[2001:db8:1:2:ffff:ffff:ffff:ffff]:1", 32, 64);
        assert_eq!(a, id("[2001:db8:1:2::]:1", 32, 64));
        assert_ne!(a, id("[2001:db8:1:1:ffff:ffff:ffff:ffff]:1", 32, 64));
        // Non-UTF-8 bytes are no address.
        assert_eq!(
            client_id(b"\xff\xfe:1", Prefixes { v4: 8, v6: 8 }).as_ref(),
            b"\xff\xfe"
        );
    }

    #[test]
    fn masks() {
        assert_eq!(mask32(32), u32::MAX);
        assert_eq!(mask32(24), 0xffff_ff00);
        assert_eq!(mask32(1), 0x8000_0000);
        assert_eq!(mask32(0), 0);
        assert_eq!(mask128(128), u128::MAX);
        assert_eq!(mask128(64), u128::MAX << 64);
        assert_eq!(mask128(0), 0);
    }
}
