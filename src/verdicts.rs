//! Buckets this VM has seen over their limit, until their window's reset (issue 13, SPEC §10).
//!
//! Within a fixed window a count never goes down, and a rejected request is not counted (a
//! Rate Limit Service's OVER_LIMIT, too, holds until the reset), so a bucket seen exhausted
//! stays exhausted until its reset: its next requests need neither a shared-data read nor a
//! call. Entries are keyed by the bucket's fingerprint and hold the limit they were seen
//! with, so a configuration that changes the bucket's limit asks again. The map is bounded;
//! when full it drops what has expired, then starts over (the shared counter set still knows).

use std::collections::BTreeMap;

use crate::limiter::Limit;

/// Entries kept per VM.
pub const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Default)]
pub struct Exhausted {
    buckets: BTreeMap<u64, (u64, Limit)>,
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
            self.buckets.retain(|_, (reset, _)| *reset > now_ms);
            if self.buckets.len() >= MAX_ENTRIES {
                self.buckets.clear();
            }
        }
        self.buckets.insert(fingerprint, (reset_ms, limit));
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
    fn bounded_expired_entries_go_first() {
        let mut e = Exhausted::default();
        let l = Limit::of(1, 1_000);
        for fp in 0..MAX_ENTRIES as u64 {
            e.remember(fp, l, if fp % 2 == 0 { 100 } else { 5_000 }, 0);
        }
        assert_eq!(e.len(), MAX_ENTRIES);
        e.remember(999_999, l, 5_000, 200);
        assert_eq!(e.len(), MAX_ENTRIES / 2 + 1);
        assert_eq!(e.until(1, l, 300), Some(5_000));
        // All live: it starts over rather than grow.
        let mut full = Exhausted::default();
        for fp in 0..MAX_ENTRIES as u64 {
            full.remember(fp, l, 5_000, 0);
        }
        full.remember(999_999, l, 5_000, 1);
        assert_eq!(full.len(), 1);
    }
}
