//! The proxy-wasm serialized header map: writing one (local replies) and reading several
//! request headers out of one (the proxy-wasm
//! `get_header_map_pairs` format), in place: one host call instead of one per header, which
//! matters because every host call crosses into V8 and copies.
//!
//! Format: u32 count, then count × (u32 name length, u32 value length), then each name and
//! value followed by a NUL byte. Anything malformed yields "absent", never a panic.

/// The values of `names` (lower-case, as Envoy stores header names), first occurrence each.
pub fn find<'a, const N: usize>(serialized: &'a [u8], names: [&str; N]) -> [Option<&'a [u8]>; N] {
    let mut found = [None; N];
    let Some(count) = read_u32(serialized, 0) else {
        return found;
    };
    let count = count as usize;
    let Some(mut data) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return found;
    };
    for i in 0..count {
        let (Some(name_len), Some(value_len)) = (
            read_u32(serialized, 4 + i * 8),
            read_u32(serialized, 8 + i * 8),
        ) else {
            return found;
        };
        let (name_len, value_len) = (name_len as usize, value_len as usize);
        let Some(name) = serialized.get(data..data.saturating_add(name_len)) else {
            return found;
        };
        let value_start = data.saturating_add(name_len).saturating_add(1);
        let Some(value) = serialized.get(value_start..value_start.saturating_add(value_len)) else {
            return found;
        };
        data = value_start.saturating_add(value_len).saturating_add(1);
        for (slot, wanted) in found.iter_mut().zip(names.iter()) {
            if slot.is_none() && name == wanted.as_bytes() {
                *slot = Some(value);
            }
        }
    }
    found
}

/// Serialises headers the way the ABI wants them: count, (name len, value len)*, then each
/// name and value NUL-terminated.
pub fn serialize<V: AsRef<[u8]>>(headers: &[(&str, V)]) -> Vec<u8> {
    let mut size = 4;
    for (k, v) in headers {
        size += 10 + k.len() + v.as_ref().len();
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn finds_values_in_place() {
        let map = serialize::<&[u8]>(&[
            (":method", b"GET"),
            (":path", b"/api/v1/x"),
            ("x-user-id", b""),
            ("x-auth-token", &[0xff, 0xfe]),
            ("x-user-id", b"second"),
        ]);
        let [m, p, u, t, absent] = find(
            &map,
            [":method", ":path", "x-user-id", "x-auth-token", "nope"],
        );
        assert_eq!(m, Some(&b"GET"[..]));
        assert_eq!(p, Some(&b"/api/v1/x"[..]));
        assert_eq!(u, Some(&b""[..]));
        assert_eq!(t, Some(&[0xff, 0xfe][..]));
        assert_eq!(absent, None);
    }

    #[test]
    fn malformed_maps_are_absent_not_a_panic() {
        let map = serialize::<&[u8]>(&[(":method", b"GET"), (":path", b"/x")]);
        for cut in 0..map.len() {
            let _ = find(&map[..cut], [":method", ":path"]);
        }
        assert_eq!(find(&[0xff; 12], [":path"]), [None]);
        assert_eq!(find(&[], [":path"]), [None]);
    }
}
