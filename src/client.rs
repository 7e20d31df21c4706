//! Client identity (SPEC §4.1): Envoy's downstream remote address, port removed.

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
mod tests {
    use super::client_ip;

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
}
