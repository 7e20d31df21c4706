//! The counter store: one seam between the limiter and wherever counts live (today Envoy's
//! shared data; SPEC §10 plans a second backend behind the same seam).
//!
//! Envoy's shared data has a trap: `set` with cas 0 is unconditional, and that is what a
//! first write of a missing key must use. Two workers creating the same key at once would
//! lose one update. So every counter key is created *before* traffic, at configure time
//! ([`ensure_table`]), and the request path only ever writes with the CAS of a real read.

use std::num::NonZeroU32;

use crate::limiter::{self, Limit, Set, Verdict};
use crate::response::Decimal;

/// Errors a store reports. Everything the host can answer maps to one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    CasMismatch,
    /// Any other status: the request is let through and the metric says so.
    Host(u32),
}

/// A key-value store with compare-and-swap versions, like Envoy's shared data.
pub trait SharedStore {
    /// `Ok(None)`: no such key. `Ok(Some((value, cas)))` otherwise; `value` is written into
    /// `buf` (cleared first) to spare an allocation per request.
    fn get(&self, key: &str, buf: &mut Vec<u8>) -> Result<Option<u32>, StoreError>;
    /// `cas` 0 is an unconditional write.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

/// How many times a request re-reads and retries its CAS before giving up (and passing).
/// With N workers a retry only fails if another worker wrote the same set in between, so
/// this bound is only reached under pathological contention.
pub const MAX_CAS_ATTEMPTS: u32 = 64;

/// Placeholder value of a created, never-used counter key (decodes as an empty set).
pub const EMPTY_SET: &[u8] = &[0];

/// What counting a request decided (the limiter's decision, once written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub verdict: Verdict,
    pub collision: bool,
    pub new_slot: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountOutcome {
    Decided(Counted),
    /// The store failed or contention outlasted the retries: let the request through.
    Failed(StoreError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountResult {
    pub outcome: CountOutcome,
    /// CAS mismatches retried.
    pub retries: u32,
}

/// Shared-data key of counter set `index` in a table of `sets` sets. The size is part of the
/// name: a table of another size is another table (a resize starts fresh counts).
pub fn set_key(out: &mut String, sets: NonZeroU32, index: u32) {
    out.clear();
    out.push_str("rlrc1:");
    out.push_str(Decimal::new(u64::from(sets.get())).as_str());
    out.push(':');
    out.push_str(Decimal::new(u64::from(index)).as_str());
}

/// Key that says table `sets` has been fully created.
pub fn ready_key(sets: NonZeroU32) -> String {
    format!("rlrc1:{sets}:ready")
}

/// The one get → decide → set-with-cas loop.
pub fn count<S: SharedStore>(
    store: &S,
    key: &str,
    buf: &mut Vec<u8>,
    fingerprint: u64,
    limit: Limit,
    now_ms: u64,
) -> CountResult {
    let mut retries = 0;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let cas = match store.get(key, buf) {
            Ok(Some(cas)) => cas,
            Ok(None) => {
                // Only if the table was never created (it is, at configure time). Creating it
                // here with cas 0 could race another worker; the placeholder holds no counts,
                // so at worst a concurrent first count is retried.
                if let Err(e) = store.set(key, EMPTY_SET, 0) {
                    return CountResult {
                        outcome: CountOutcome::Failed(e),
                        retries,
                    };
                }
                continue;
            }
            Err(e) => {
                return CountResult {
                    outcome: CountOutcome::Failed(e),
                    retries,
                }
            }
        };
        let set = Set::decode(buf);
        let decision = limiter::decide(&set, fingerprint, limit, now_ms);
        let counted = Counted {
            verdict: decision.verdict,
            collision: decision.collision,
            new_slot: decision.new_slot,
        };
        let Some(next) = decision.write else {
            return CountResult {
                outcome: CountOutcome::Decided(counted),
                retries,
            };
        };
        match store.set(key, &next.encode(), cas) {
            Ok(()) => {
                return CountResult {
                    outcome: CountOutcome::Decided(counted),
                    retries,
                }
            }
            Err(StoreError::CasMismatch) => retries += 1,
            Err(e) => {
                return CountResult {
                    outcome: CountOutcome::Failed(e),
                    retries,
                }
            }
        }
    }
    CountResult {
        outcome: CountOutcome::Failed(StoreError::CasMismatch),
        retries,
    }
}

/// Creates the missing keys of a table of `sets` sets; never touches an existing key, so a
/// configuration push (whose `on_configure` runs beside live traffic, even for a config Envoy
/// then rejects) keeps every count. Returns how many keys it created.
pub fn ensure_table<S: SharedStore>(store: &S, sets: NonZeroU32) -> Result<u32, StoreError> {
    let ready = ready_key(sets);
    let mut buf = Vec::new();
    if store.get(&ready, &mut buf)?.is_some() {
        return Ok(0);
    }
    let mut created = 0;
    let mut key = String::new();
    for index in 0..sets.get() {
        set_key(&mut key, sets, index);
        if store.get(&key, &mut buf)?.is_none() {
            store.set(&key, EMPTY_SET, 0)?;
            created += 1;
        }
    }
    store.set(&ready, b"1", 0)?;
    Ok(created)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
pub mod memory {
    //! An in-memory store with Envoy's CAS semantics, for native tests of the logic above.
    //! The real thing is exercised by the tests that run Envoy.
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    #[derive(Default)]
    pub struct MemoryStore {
        pub map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: RefCell<u32>,
        /// Fail the next N sets with a CAS mismatch (simulates another worker writing).
        pub contend: RefCell<u32>,
    }

    impl SharedStore for MemoryStore {
        fn get(&self, key: &str, buf: &mut Vec<u8>) -> Result<Option<u32>, StoreError> {
            buf.clear();
            Ok(self.map.borrow().get(key).map(|(v, cas)| {
                buf.extend_from_slice(v);
                *cas
            }))
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            if *self.contend.borrow() > 0 {
                *self.contend.borrow_mut() -= 1;
                return Err(StoreError::CasMismatch);
            }
            let mut map = self.map.borrow_mut();
            if let Some((_, current)) = map.get(key) {
                if cas != 0 && cas != *current {
                    return Err(StoreError::CasMismatch);
                }
            }
            *self.next_cas.borrow_mut() += 1;
            let c = *self.next_cas.borrow();
            map.insert(key.to_string(), (value.to_vec(), c));
            Ok(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::memory::MemoryStore;
    use super::*;

    fn sets(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn l2() -> Limit {
        Limit::of(2, 1000)
    }

    #[test]
    fn keys_are_formatted_without_allocation_surprises() {
        let mut k = String::new();
        set_key(&mut k, sets(1250), 0);
        assert_eq!(k, "rlrc1:1250:0");
        set_key(&mut k, sets(u32::MAX), 4_000_000_000);
        assert_eq!(k, "rlrc1:4294967295:4000000000");
    }

    #[test]
    fn ensure_table_creates_missing_and_keeps_existing() {
        let store = MemoryStore::default();
        let mut key = String::new();
        set_key(&mut key, sets(4), 2);
        store.set(&key, b"live", 0).unwrap();
        assert_eq!(ensure_table(&store, sets(4)).unwrap(), 3);
        assert_eq!(store.map.borrow()[&key].0, b"live");
        // Second run: the ready marker short-cuts it.
        assert_eq!(ensure_table(&store, sets(4)).unwrap(), 0);
        assert_eq!(store.map.borrow().len(), 5);
    }

    #[test]
    fn count_retries_cas_mismatch_then_decides() {
        let store = MemoryStore::default();
        ensure_table(&store, sets(1)).unwrap();
        let mut key = String::new();
        set_key(&mut key, sets(1), 0);
        let mut buf = Vec::new();
        *store.contend.borrow_mut() = 3;
        let r = count(&store, &key, &mut buf, 9, l2(), 5);
        assert_eq!(r.retries, 3);
        assert!(matches!(
            r.outcome,
            CountOutcome::Decided(Counted {
                verdict: Verdict::Allowed { remaining: 1, .. },
                ..
            })
        ));
        count(&store, &key, &mut buf, 9, l2(), 5);
        let r = count(&store, &key, &mut buf, 9, l2(), 5);
        assert!(matches!(
            r.outcome,
            CountOutcome::Decided(Counted {
                verdict: Verdict::Limited { .. },
                ..
            })
        ));
    }

    #[test]
    fn endless_contention_fails_open_after_bounded_attempts() {
        let store = MemoryStore::default();
        ensure_table(&store, sets(1)).unwrap();
        let mut key = String::new();
        set_key(&mut key, sets(1), 0);
        *store.contend.borrow_mut() = u32::MAX;
        let r = count(&store, &key, &mut Vec::new(), 9, l2(), 5);
        assert_eq!(r.outcome, CountOutcome::Failed(StoreError::CasMismatch));
        assert_eq!(r.retries, MAX_CAS_ATTEMPTS);
    }

    #[test]
    fn missing_key_is_created_then_counted() {
        let store = MemoryStore::default();
        let r = count(&store, "k", &mut Vec::new(), 9, l2(), 5);
        assert!(matches!(r.outcome, CountOutcome::Decided(_)));
        assert_eq!(store.map.borrow()["k"].0.len(), crate::limiter::SET_BYTES);
    }
}
