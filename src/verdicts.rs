//! Buckets this VM has seen over their limit, until their window's reset (issue 13, SPEC §10).
//!
//! Within a fixed window a count never goes down, and a rejected request is not counted (a
//! Rate Limit Service's OVER_LIMIT, too, holds until the reset), so a bucket seen exhausted
//! stays exhausted until its reset: its next requests need neither a shared-data read nor a
//! call. Entries are keyed by the bucket's fingerprint and hold the limit they were seen
//! with, so a configuration that changes the bucket's limit asks again. The map is bounded;
//! when full it drops what has expired, then (if more than half is still live) a pseudo-random
//! half, so that a flood from more buckets than it holds still finds part of them known (the
//! shared counter set still knows the rest: a miss costs one read, never exactness).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::limiter::Limit;

/// Entries kept per VM: every bucket of a flood from 1,000 clients on 20 routes (the
/// benchmark's), and at most about 1 MB (32-byte entries in a table of 32,768 slots, which
/// holds 28,672 at its 7/8 load).
pub const MAX_ENTRIES: usize = 28_672;

/// A fingerprint is already a keyed 64-bit hash: the table uses it as is.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Table = HashMap<u64, (u64, Limit), BuildHasherDefault<Identity>>;

#[derive(Default)]
pub struct Exhausted {
    buckets: Table,
    /// Which fingerprint bit picks the half dropped by the next eviction.
    evictions: u32,
}

impl core::fmt::Debug for Exhausted {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Exhausted")
            .field("len", &self.buckets.len())
            .finish()
    }
}

impl Exhausted {
    /// The reset of `fingerprint` if it is known exhausted under `limit` at `now_ms`.
    pub fn until(&self, fingerprint: u64, limit: Limit, now_ms: u64) -> Option<u64> {
        let (reset_ms, seen_with) = self.buckets.get(&fingerprint)?;
        (*seen_with == limit && now_ms < *reset_ms).then_some(*reset_ms)
    }

    /// Remembers that `fingerprint` is over `limit` until `reset_ms`.
    pub fn remember(&mut self, fingerprint: u64, limit: Limit, reset_ms: u64, now_ms: u64) {
        if self.buckets.len() >= MAX_ENTRIES && !self.buckets.contains_key(&fingerprint) {
            self.evict(now_ms);
        }
        self.buckets.insert(fingerprint, (reset_ms, limit));
    }

    /// Makes room: drops the expired entries, then, if more than half are live, about half of
    /// them (those with one fingerprint bit set, a different bit each time). Rebuilt rather
    /// than erased in place, so that no tombstone makes the table grow past its bound.
    fn evict(&mut self, now_ms: u64) {
        let live = self
            .buckets
            .values()
            .filter(|(reset, _)| *reset > now_ms)
            .count();
        let bit = 32 + self.evictions % 32;
        self.evictions = self.evictions.wrapping_add(1);
        let halve = live > MAX_ENTRIES / 2;
        let mut next = Table::with_capacity_and_hasher(MAX_ENTRIES, Default::default());
        next.extend(
            self.buckets
                .drain()
                .filter(|(fp, (reset, _))| *reset > now_ms && !(halve && (fp >> bit) & 1 == 1)),
        );
        self.buckets = next;
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    /// Spread like real fingerprints (keyed SipHash outputs).
    fn fp(i: u64) -> u64 {
        i.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17) ^ 0x5851_f42d_4c95_7f2d
    }

    #[test]
    fn exhausted_until_the_reset_and_only_under_the_same_limit() {
        let mut e = Exhausted::default();
        let l = Limit::of(5, 60_000);
        e.remember(7, l, 60_000, 10);
        assert_eq!(e.until(7, l, 59_999), Some(60_000));
        assert_eq!(e.until(7, l, 60_000), None);
        assert_eq!(e.until(8, l, 100), None);
        // A push that changes the bucket's limit (either way) asks again.
        assert_eq!(e.until(7, Limit::of(6, 60_000), 100), None);
        assert_eq!(e.until(7, Limit::of(5, 1_000), 100), None);
    }

    #[test]
    fn a_flood_from_the_benchmarks_20000_buckets_is_known_whole() {
        let mut e = Exhausted::default();
        let l = Limit::of(1, 86_400_000);
        for i in 0..20_000 {
            e.remember(fp(i), l, 86_400_000, 0);
        }
        assert!((0..20_000).all(|i| e.until(fp(i), l, 1).is_some()));
    }

    #[test]
    fn bounded_expired_entries_go_first() {
        let mut e = Exhausted::default();
        let l = Limit::of(1, 1_000);
        for i in 0..MAX_ENTRIES as u64 {
            e.remember(fp(i), l, if i % 2 == 0 { 100 } else { 5_000 }, 0);
        }
        assert_eq!(e.len(), MAX_ENTRIES);
        e.remember(fp(999_999), l, 5_000, 200);
        assert_eq!(e.len(), MAX_ENTRIES / 2 + 1);
        assert_eq!(e.until(fp(1), l, 300), Some(5_000));
        assert_eq!(e.until(fp(999_999), l, 300), Some(5_000));
    }

    #[test]
    fn bounded_all_live_about_half_is_kept() {
        let mut full = Exhausted::default();
        let l = Limit::of(1, 86_400_000);
        for i in 0..MAX_ENTRIES as u64 {
            full.remember(fp(i), l, 5_000, 0);
        }
        full.remember(fp(999_999), l, 5_000, 1);
        let kept = full.len();
        assert!(
            (MAX_ENTRIES * 2 / 5..MAX_ENTRIES * 3 / 5).contains(&kept),
            "{kept}"
        );
        assert_eq!(full.until(fp(999_999), l, 2), Some(5_000));
        // What is kept is still exact; the rest is merely unknown (one shared read each).
        let known = (0..MAX_ENTRIES as u64)
            .filter(|i| full.until(fp(*i), l, 2).is_some())
            .count();
        assert_eq!(known + 1, kept);
        // Many more buckets than it holds: it stays bounded, and keeps a share of them.
        for i in 0..4 * MAX_ENTRIES as u64 {
            full.remember(fp(1_000_000 + i), l, 5_000, 2);
            assert!(full.len() <= MAX_ENTRIES);
        }
        assert!(full.len() > MAX_ENTRIES / 3);
    }
}
