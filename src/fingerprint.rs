//! The bucket fingerprint: a keyed 64-bit hash of (client IP, method, route bucket).
//!
//! The key (seed) is random per Envoy process and shared by all its VMs through shared data,
//! so every worker computes the same fingerprint while an attacker cannot aim many buckets at
//! one counter set to push a victim into a shared (conservatively counted) slot.

#![allow(deprecated)] // core's SipHasher is deprecated in name only: stable, keyed, and enough here.

use core::hash::{Hasher, SipHasher};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seed(pub u64, pub u64);

impl Seed {
    pub fn from_bytes(bytes: &[u8]) -> Option<Seed> {
        let k0: [u8; 8] = bytes.get(0..8)?.try_into().ok()?;
        let k1: [u8; 8] = bytes.get(8..16)?.try_into().ok()?;
        Some(Seed(u64::from_le_bytes(k0), u64::from_le_bytes(k1)))
    }

    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        let (k0, k1) = out.split_at_mut(8);
        k0.copy_from_slice(&self.0.to_le_bytes());
        k1.copy_from_slice(&self.1.to_le_bytes());
        out
    }
}

/// Never 0 (0 marks a never-used slot). `bucket`: the route bucket (`route::Route`).
pub fn fingerprint(seed: Seed, client_ip: &[u8], method: &[u8], bucket: &[u8]) -> u64 {
    let mut h = SipHasher::new_with_keys(seed.0, seed.1);
    // Lengths first, so that no two different triples hash the same byte stream.
    h.write_usize(client_ip.len());
    h.write(client_ip);
    h.write_usize(method.len());
    h.write(method);
    h.write_usize(bucket.len());
    h.write(bucket);
    h.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_parts_distinct_fingerprints() {
        let s = Seed(1, 2);
        let a = fingerprint(s, b"1.2.3.4", b"GET", b"/a");
        assert_eq!(a, fingerprint(s, b"1.2.3.4", b"GET", b"/a"));
        assert_ne!(a, fingerprint(s, b"1.2.3.5", b"GET", b"/a"));
        assert_ne!(a, fingerprint(s, b"1.2.3.4", b"POST", b"/a"));
        assert_ne!(a, fingerprint(s, b"1.2.3.4", b"GET", b"/b"));
        assert_ne!(a, fingerprint(Seed(1, 3), b"1.2.3.4", b"GET", b"/a"));
        assert_ne!(
            fingerprint(s, b"1.2.3.4", b"GET", b"/x"),
            fingerprint(s, b"1.2.3.4G", b"ET", b"/x")
        );
    }

    #[test]
    fn seed_round_trip() {
        let s = Seed(0x0102030405060708, u64::MAX);
        assert_eq!(Seed::from_bytes(&s.to_bytes()), Some(s));
        assert_eq!(Seed::from_bytes(&[1, 2, 3]), None);
    }
}
