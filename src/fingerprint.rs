//! The bucket fingerprint: a keyed 64-bit hash of (client IP, method, route bucket).
//!
//! The key (seed) is random per Envoy process and shared by all its VMs through shared data,
//! so every worker computes the same fingerprint while an attacker cannot aim many buckets at
//! one counter set to push a victim into a shared (conservatively counted) slot.

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
///
/// SipHash-1-3 (the rounds of Rust's own `HashMap` hasher) over the three parts, each as its
/// length in one 64-bit word, then its bytes zero-padded to whole words: an encoding no two
/// different triples share. It runs on every limited request; SipHash-2-4 through `core`'s
/// byte-stream hasher cost ~1.5k wasm instructions there, and nothing here needs its margin
/// (the key is secret and per process; a collision only merges two buckets' counts).
pub fn fingerprint(seed: Seed, client_ip: &[u8], method: &[u8], bucket: &[u8]) -> u64 {
    let mut h = Sip::<1, 3>::new(seed);
    for part in [client_ip, method, bucket] {
        h.part(part);
    }
    h.finish().max(1)
}

/// SipHash-c-d over a message of whole 64-bit words.
struct Sip<const C: usize, const D: usize> {
    v: [u64; 4],
    bytes: u64,
}

impl<const C: usize, const D: usize> Sip<C, D> {
    fn new(seed: Seed) -> Self {
        Sip {
            v: [
                seed.0 ^ 0x736f_6d65_7073_6575,
                seed.1 ^ 0x646f_7261_6e64_6f6d,
                seed.0 ^ 0x6c79_6765_6e65_7261,
                seed.1 ^ 0x7465_6462_7974_6573,
            ],
            bytes: 0,
        }
    }

    fn round(&mut self) {
        let [mut v0, mut v1, mut v2, mut v3] = self.v;
        v0 = v0.wrapping_add(v1);
        v1 = v1.rotate_left(13) ^ v0;
        v0 = v0.rotate_left(32);
        v2 = v2.wrapping_add(v3);
        v3 = v3.rotate_left(16) ^ v2;
        v0 = v0.wrapping_add(v3);
        v3 = v3.rotate_left(21) ^ v0;
        v2 = v2.wrapping_add(v1);
        v1 = v1.rotate_left(17) ^ v2;
        v2 = v2.rotate_left(32);
        self.v = [v0, v1, v2, v3];
    }

    fn word(&mut self, m: u64) {
        self.v[3] ^= m;
        for _ in 0..C {
            self.round();
        }
        self.v[0] ^= m;
        self.bytes = self.bytes.wrapping_add(8);
    }

    /// The length, then the bytes, zero-padded to whole words.
    fn part(&mut self, bytes: &[u8]) {
        self.word(bytes.len() as u64);
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.word(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            if let Some(head) = b.get_mut(..rest.len()) {
                head.copy_from_slice(rest);
            }
            self.word(u64::from_le_bytes(b));
        }
    }

    fn finish(mut self) -> u64 {
        // The last block of a message of whole words: only its length byte.
        self.word((self.bytes & 0xff) << 56);
        self.v[2] ^= 0xff;
        for _ in 0..D {
            self.round();
        }
        let [v0, v1, v2, v3] = self.v;
        v0 ^ v1 ^ v2 ^ v3
    }
}

#[cfg(test)]
mod tests {
    #![allow(deprecated)] // core's SipHasher (SipHash-2-4): deprecated in name only, the reference here.
    use super::*;
    use core::hash::{Hasher, SipHasher};

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

    /// The same code with SipHash-2-4's rounds is `core`'s SipHasher over the same bytes: the
    /// rounds, the key setup and the finalization are SipHash's.
    #[test]
    fn it_is_siphash() {
        let seed = Seed(0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);
        for parts in [
            vec![&b""[..]],
            vec![&b"10.1.0.1"[..], b"GET", b"/api/v1/users.info"],
            vec![
                &b"2001:db8::1"[..],
                b"POST",
                b"/api/v1/chat.sendMessage/0123456789abcdef",
            ],
        ] {
            let mut ours = Sip::<2, 4>::new(seed);
            let mut stream = Vec::new();
            for p in &parts {
                ours.part(p);
                stream.extend_from_slice(&(p.len() as u64).to_le_bytes());
                stream.extend_from_slice(p);
                stream.resize(stream.len().div_ceil(8) * 8, 0);
            }
            let mut core = SipHasher::new_with_keys(seed.0, seed.1);
            core.write(&stream);
            assert_eq!(ours.finish(), core.finish(), "{parts:?}");
        }
    }

    #[test]
    fn part_boundaries_matter() {
        let s = Seed(9, 9);
        // Padding cannot hide a boundary: the lengths are hashed too.
        assert_ne!(
            fingerprint(s, b"a", b"", b"b"),
            fingerprint(s, b"a\0", b"", b"b")
        );
        assert_ne!(
            fingerprint(s, b"ab", b"", b""),
            fingerprint(s, b"a", b"b", b"")
        );
        assert_ne!(
            fingerprint(s, b"", b"", b""),
            fingerprint(s, b"", b"", b"\0")
        );
    }

    #[test]
    fn seed_round_trip() {
        let s = Seed(0x0102030405060708, u64::MAX);
        assert_eq!(Seed::from_bytes(&s.to_bytes()), Some(s));
        assert_eq!(Seed::from_bytes(&[1, 2, 3]), None);
    }
}
