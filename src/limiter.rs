//! The counter update, as a pure function of the old state (SPEC §4, §6).
//!
//! Counters live in a fixed table of shared-data keys, each holding one *set* of
//! [`WAYS_PER_SET`] client-counter slots ("ways"). A bucket (client IP, route bucket, method)
//! hashes to a 64-bit fingerprint; the fingerprint picks the set, and the bucket lives in
//! one way of that set. Because a whole set is one value, one read and one compare-and-swap
//! update the bucket and any slot it claims, atomically.
//!
//! A way is free when it was never used or its window has ended. When every way of a set is
//! held by a live bucket, the newcomer is *merged* into one deterministic way of the set:
//! it counts there together with the owner, and the way's window end becomes the later of
//! the two. The merged count is at least the newcomer's own count, and it lasts at least until
//! the newcomer's own window ends, so a client in a full table is never under-counted (it
//! may be limited early: that is the conservative side). The way is flagged `shared`, so the
//! newcomer keeps finding it (and never starts a fresh count elsewhere) until it expires.

use std::num::{NonZeroU32, NonZeroU64};

/// Ways (client-counter slots) per shared-data key.
pub const WAYS_PER_SET: u32 = 8;

/// A limit: L requests per aligned window of `interval_ms`. Both are non-zero by type, so no
/// code downstream has to guard against a zero limit or a zero-length window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub requests: NonZeroU32,
    pub interval_ms: NonZeroU64,
}

impl Limit {
    /// Rocket.Chat's `API_Enable_Rate_Limiter_Limit_Calls_Default` / `_Time_Default`.
    pub const ROCKETCHAT_DEFAULT: Limit = Limit {
        requests: NonZeroU32::MIN.saturating_add(9),
        interval_ms: NonZeroU64::MIN.saturating_add(59_999),
    };

    /// `None` if either number is 0.
    pub fn new(requests: u32, interval_ms: u64) -> Option<Limit> {
        Some(Limit {
            requests: NonZeroU32::new(requests)?,
            interval_ms: NonZeroU64::new(interval_ms)?,
        })
    }

    /// For tests: a limit that must be valid.
    #[cfg(test)]
    #[allow(clippy::unwrap_used)]
    pub fn of(requests: u32, interval_ms: u64) -> Limit {
        Limit::new(requests, interval_ms).unwrap()
    }
}

const WAYS: usize = WAYS_PER_SET as usize;
const WAY_BYTES: usize = 20;
/// Encoded size of a set.
pub const SET_BYTES: usize = WAYS * WAY_BYTES;
const SHARED_FLAG: u32 = 1 << 31;
const COUNT_MASK: u32 = !SHARED_FLAG;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Way {
    /// 0: never used.
    fingerprint: u64,
    /// The window's end, UTC epoch ms (exclusive).
    end_ms: u64,
    count: u32,
    shared: bool,
}

impl Way {
    fn is_free(&self, now_ms: u64) -> bool {
        self.fingerprint == 0 || self.end_ms <= now_ms
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Set {
    ways: [Way; WAYS],
}

impl Set {
    /// Any value that is not a well-formed set (the 1-byte placeholder written when the key is
    /// created, or a value of some other format) is an empty set.
    pub fn decode(bytes: &[u8]) -> Set {
        let mut ways = [Way::default(); WAYS];
        if bytes.len() != SET_BYTES {
            return Set { ways };
        }
        for (way, chunk) in ways.iter_mut().zip(bytes.chunks_exact(WAY_BYTES)) {
            let mut fp = [0u8; 8];
            let mut end = [0u8; 8];
            let mut count = [0u8; 4];
            fp.copy_from_slice(chunk.get(0..8).unwrap_or(&[0; 8]));
            end.copy_from_slice(chunk.get(8..16).unwrap_or(&[0; 8]));
            count.copy_from_slice(chunk.get(16..20).unwrap_or(&[0; 4]));
            let raw_count = u32::from_le_bytes(count);
            *way = Way {
                fingerprint: u64::from_le_bytes(fp),
                end_ms: u64::from_le_bytes(end),
                count: raw_count & COUNT_MASK,
                shared: raw_count & SHARED_FLAG != 0,
            };
        }
        Set { ways }
    }

    pub fn encode(&self) -> [u8; SET_BYTES] {
        let mut out = [0u8; SET_BYTES];
        for (way, chunk) in self.ways.iter().zip(out.chunks_exact_mut(WAY_BYTES)) {
            let count = way.count.min(COUNT_MASK) | if way.shared { SHARED_FLAG } else { 0 };
            let (fp, rest) = chunk.split_at_mut(8);
            let (end, cnt) = rest.split_at_mut(8);
            fp.copy_from_slice(&way.fingerprint.to_le_bytes());
            end.copy_from_slice(&way.end_ms.to_le_bytes());
            cnt.copy_from_slice(&count.to_le_bytes());
        }
        out
    }

    /// Ways holding a bucket (ever used).
    pub fn used_ways(&self) -> usize {
        self.ways.iter().filter(|w| w.fingerprint != 0).count()
    }
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted: `remaining` = L - count.
    Allowed { remaining: u32, reset_ms: u64 },
    /// Over the limit: not counted, window not extended (SPEC §4.4).
    Limited { reset_ms: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The new set to write with CAS; `None` when nothing changes (a rejected request).
    pub write: Option<Set>,
    /// The bucket counted in a way it shares with another bucket (SPEC §6 metric).
    pub collision: bool,
    /// A never-used way was taken (for the `tracked_clients` gauge).
    pub new_slot: bool,
}

/// Which set of `sets` a fingerprint lives in.
pub fn set_index(fingerprint: u64, sets: NonZeroU32) -> u32 {
    (fingerprint % u64::from(sets.get())) as u32
}

/// The way a bucket merges into when its set is full: from bits the set index does not use.
fn merge_way(fingerprint: u64) -> usize {
    ((fingerprint >> 56) as usize) % WAYS
}

/// Aligned fixed window (SPEC §4.2): the end of the window holding `now_ms`.
pub fn window_end(now_ms: u64, interval_ms: NonZeroU64) -> u64 {
    let interval = interval_ms.get();
    (now_ms / interval)
        .saturating_add(1)
        .saturating_mul(interval)
}

/// The way of `set` the bucket `fingerprint` counts in at `now_ms`: its own, the shared way
/// it was merged into, a free way (claimed for it), or, in a full set, its merge way.
/// Returns (index, collision, new_slot).
fn place(set: &mut Set, fingerprint: u64, now_ms: u64) -> (usize, bool, bool) {
    let merge = merge_way(fingerprint);
    if let Some(i) = set.ways.iter().position(|w| w.fingerprint == fingerprint) {
        (i, false, false)
    } else if set
        .ways
        .get(merge)
        .is_some_and(|w| w.shared && w.end_ms > now_ms)
    {
        (merge, true, false)
    } else if let Some(i) = set.ways.iter().position(|w| w.is_free(now_ms)) {
        let new_slot = set.ways.get(i).is_some_and(|w| w.fingerprint == 0);
        if let Some(w) = set.ways.get_mut(i) {
            *w = Way {
                fingerprint,
                end_ms: 0,
                count: 0,
                shared: false,
            };
        }
        (i, false, new_slot)
    } else {
        (merge, true, false)
    }
}

/// Marks the bucket exhausted for the rest of its window (a rate-limit engine answered
/// OVER_LIMIT, SPEC §10): its count becomes at least the limit, so every later request of
/// the window is limited without asking. `None` when the set already says so.
pub fn exhaust(set: &Set, fingerprint: u64, limit: Limit, now_ms: u64) -> Option<Set> {
    let fingerprint = fingerprint.max(1);
    let own_end = window_end(now_ms, limit.interval_ms);
    let mut next = *set;
    let (index, collision, _) = place(&mut next, fingerprint, now_ms);
    let way = next.ways.get_mut(index)?;
    if way.end_ms <= now_ms {
        way.count = 0;
        way.end_ms = own_end;
        way.shared = false;
    } else if collision {
        way.end_ms = way.end_ms.max(own_end);
        way.shared = true;
    }
    if way.count >= limit.requests.get() {
        return None;
    }
    way.count = limit.requests.get();
    Some(next)
}

/// Counts one request of the bucket `fingerprint` (non-zero) against `limit` at `now_ms`.
pub fn decide(set: &Set, fingerprint: u64, limit: Limit, now_ms: u64) -> Decision {
    let fingerprint = fingerprint.max(1);
    let own_end = window_end(now_ms, limit.interval_ms);
    let mut next = *set;
    let (index, collision, new_slot) = place(&mut next, fingerprint, now_ms);

    let Some(way) = next.ways.get_mut(index) else {
        // Unreachable: every index above is < WAYS. Fail open rather than trap.
        return Decision {
            verdict: Verdict::Allowed {
                remaining: 0,
                reset_ms: own_end,
            },
            write: None,
            collision: false,
            new_slot: false,
        };
    };
    if way.end_ms <= now_ms {
        // The window ended: a fresh one (for every bucket merged here too, since the merged
        // end is the latest of their ends).
        way.count = 0;
        way.end_ms = own_end;
        way.shared = false;
    } else if collision {
        way.end_ms = way.end_ms.max(own_end);
        way.shared = true;
    }
    // A count at the top of its 31 bits is full whatever the limit (the config caps limits
    // below it; this keeps a corrupted value from wrapping).
    if way.count >= limit.requests.get() || way.count >= COUNT_MASK {
        return Decision {
            verdict: Verdict::Limited {
                reset_ms: way.end_ms,
            },
            write: None,
            collision,
            new_slot: false,
        };
    }
    way.count += 1;
    let verdict = Verdict::Allowed {
        remaining: limit.requests.get() - way.count,
        reset_ms: way.end_ms,
    };
    Decision {
        verdict,
        write: Some(next),
        collision,
        new_slot,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    fn l3() -> Limit {
        Limit::of(3, 60_000)
    }

    fn run(set: &mut Set, fp: u64, limit: Limit, now: u64) -> Decision {
        let d = decide(set, fp, limit, now);
        if let Some(s) = d.write {
            *set = s;
        }
        d
    }

    #[test]
    fn counts_then_limits_with_aligned_reset() {
        let mut s = Set::decode(&[0]);
        let now = 120_000 + 5;
        for expected in [2, 1, 0] {
            let d = run(&mut s, 7, l3(), now);
            assert_eq!(
                d.verdict,
                Verdict::Allowed {
                    remaining: expected,
                    reset_ms: 180_000
                }
            );
        }
        let d = run(&mut s, 7, l3(), now + 10);
        assert_eq!(d.verdict, Verdict::Limited { reset_ms: 180_000 });
        assert_eq!(d.write, None);
        // Next window lets it in again.
        let d = run(&mut s, 7, l3(), 180_000);
        assert_eq!(
            d.verdict,
            Verdict::Allowed {
                remaining: 2,
                reset_ms: 240_000
            }
        );
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut s = Set::decode(&[]);
        run(&mut s, 42, l3(), 1);
        run(&mut s, 43, l3(), 1);
        let bytes = s.encode();
        assert_eq!(Set::decode(&bytes), s);
        assert_eq!(s.used_ways(), 2);
    }

    #[test]
    fn distinct_buckets_get_distinct_ways_while_there_is_room() {
        let mut s = Set::decode(&[]);
        for fp in 1..=WAYS as u64 {
            let d = run(&mut s, fp, l3(), 10);
            assert!(!d.collision);
            assert!(d.new_slot);
        }
        for fp in 1..=WAYS as u64 {
            assert_eq!(
                run(&mut s, fp, l3(), 11).verdict,
                Verdict::Allowed {
                    remaining: 1,
                    reset_ms: 60_000
                }
            );
        }
    }

    #[test]
    fn full_set_merges_conservatively_and_never_under_counts() {
        let mut s = Set::decode(&[]);
        for fp in 1..=WAYS as u64 {
            run(&mut s, fp, l3(), 10);
        }
        // A newcomer in a full set shares a way: the owner's one request counts against it.
        let newcomer = 0xAB00_0000_0000_0099;
        let d = run(&mut s, newcomer, l3(), 20);
        assert!(d.collision);
        assert_eq!(
            d.verdict,
            Verdict::Allowed {
                remaining: 1,
                reset_ms: 60_000
            }
        );
        // Even when another way frees up, the newcomer keeps counting in the shared way.
        let short = Limit::of(3, 100);
        let mut s2 = Set::decode(&[]);
        for fp in 1..WAYS as u64 {
            run(&mut s2, fp, l3(), 10);
        }
        run(&mut s2, 1000, short, 10); // ends at 100
        let nc = merge_target_fp(&s2, 1000);
        let d = run(&mut s2, nc, l3(), 20);
        assert!(d.collision);
        // way of fingerprint 1000 may or may not be the merge target; if it frees up, the
        // newcomer must still count in its shared way.
        let mut passed = 1;
        for t in [150, 200, 300, 400] {
            if let Verdict::Allowed { .. } = run(&mut s2, nc, l3(), t).verdict {
                passed += 1;
            }
        }
        assert!(passed <= 3, "newcomer passed {passed} times with limit 3");
    }

    /// A fingerprint whose merge way is not the way of `avoid` (so that way can free up).
    fn merge_target_fp(s: &Set, avoid: u64) -> u64 {
        let avoid_way = s.ways.iter().position(|w| w.fingerprint == avoid).unwrap();
        (0u64..)
            .map(|i| (i << 56) | 0x5555)
            .find(|fp| merge_way(*fp) != avoid_way)
            .unwrap()
    }

    #[test]
    fn merged_window_ends_at_the_later_end() {
        let mut s = Set::decode(&[]);
        let short = Limit::of(100, 1_000);
        for fp in 1..=WAYS as u64 {
            run(&mut s, fp << 8, short, 10);
        }
        let nc = 0x0100_0000_0000_0001;
        let long = Limit::of(2, 60_000);
        assert!(matches!(
            run(&mut s, nc, long, 20).verdict,
            Verdict::Allowed {
                remaining: 0,
                reset_ms: 60_000
            }
        ));
        // 1 s later the owner's own window is over, but the merged one holds the newcomer's
        // count until 60 000.
        assert_eq!(
            run(&mut s, nc, long, 1_500).verdict,
            Verdict::Limited { reset_ms: 60_000 }
        );
    }

    #[test]
    fn count_kept_when_limit_changes() {
        let mut s = Set::decode(&[]);
        for _ in 0..7 {
            run(&mut s, 5, Limit::of(10, 60_000), 1);
        }
        let d = run(&mut s, 5, Limit::of(5, 60_000), 2);
        assert_eq!(d.verdict, Verdict::Limited { reset_ms: 60_000 });
        let d = run(&mut s, 5, Limit::of(20, 60_000), 3);
        assert_eq!(
            d.verdict,
            Verdict::Allowed {
                remaining: 12,
                reset_ms: 60_000
            }
        );
    }

    #[test]
    fn an_exhausted_bucket_is_limited_until_its_reset() {
        let mut s = Set::decode(&[]);
        run(&mut s, 7, l3(), 120_005);
        s = exhaust(&s, 7, l3(), 120_010).unwrap();
        assert_eq!(exhaust(&s, 7, l3(), 120_020), None);
        assert_eq!(
            run(&mut s, 7, l3(), 179_999).verdict,
            Verdict::Limited { reset_ms: 180_000 }
        );
        assert!(matches!(
            run(&mut s, 7, l3(), 180_000).verdict,
            Verdict::Allowed { remaining: 2, .. }
        ));
        // A bucket never seen is exhausted in a way of its own; others are untouched.
        let fresh = exhaust(&Set::decode(&[]), 9, l3(), 5).unwrap();
        assert_eq!(
            decide(&fresh, 9, l3(), 6).verdict,
            Verdict::Limited { reset_ms: 60_000 }
        );
        assert!(matches!(
            decide(&fresh, 10, l3(), 6).verdict,
            Verdict::Allowed { remaining: 2, .. }
        ));
    }

    #[test]
    fn window_end_is_aligned() {
        assert_eq!(window_end(0, NonZeroU64::new(1000).unwrap()), 1000);
        assert_eq!(window_end(999, NonZeroU64::new(1000).unwrap()), 1000);
        assert_eq!(window_end(1000, NonZeroU64::new(1000).unwrap()), 2000);
        assert_eq!(
            window_end(1_700_000_123_456, NonZeroU64::new(60_000).unwrap()),
            1_700_000_160_000
        );
    }
}
