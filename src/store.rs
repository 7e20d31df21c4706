//! Shared records: the one place that reads and writes Envoy's shared data with
//! compare-and-swap ([`update`]), behind the [`SharedStore`] trait (the host in the wasm
//! build, a map with Envoy's CAS semantics in native tests).
//!
//! Envoy's shared data has a trap: `set` with cas 0 is unconditional, and that is what a
//! first write of a missing key must use. Two workers creating the same key at once would
//! lose one update. So every key is created *before* traffic, at configure time
//! ([`ensure_table`], [`create_if_missing`]), and the request path only ever writes with the
//! CAS of a real read.

use std::num::NonZeroU32;

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

/// Placeholder value of a created, never-written record. Every record's decoder reads it as
/// "empty" (an empty counter set, an empty user-cache slot, no shared roles yet).
pub const EMPTY: &[u8] = &[0];

/// What an update step does after seeing the current value of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step<W, T> {
    /// Leave the record as it is, and answer `T`.
    Keep(T),
    /// Write `W` in place of the value seen (with its CAS), then answer `T`.
    Write(W, T),
}

/// The result of [`update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated<T> {
    /// The step's answer once it held, or why the store gave up (the caller lets the request
    /// through and counts a `store_errors`).
    pub result: Result<T, StoreError>,
    /// CAS mismatches retried (the `cas_retries` metric).
    pub retries: u32,
}

/// Name (key prefix) of the table of client counters.
pub const COUNTER_TABLE: &str = "rlrc1:";

/// Shared-data key of counter set `index` in a table of `sets` sets. The size is part of the
/// name: a table of another size is another table (a resize starts fresh counts).
pub fn set_key(out: &mut String, sets: NonZeroU32, index: u32) {
    table_set_key(out, COUNTER_TABLE, sets, index);
}

/// A reusable counter-set key (the `key_buf` of every count): its `rlrc1:<sets>:` prefix is
/// written once per table size and kept, so a request appends only its set's index.
#[derive(Debug, Default)]
pub struct SetKey {
    buf: String,
    /// The table size the prefix was written for (0: none yet).
    sets: u32,
    prefix_len: usize,
}

impl SetKey {
    /// [`set_key`] of `index` in a table of `sets` sets.
    pub fn of(&mut self, sets: NonZeroU32, index: u32) -> &str {
        if self.sets != sets.get() {
            self.buf.clear();
            self.buf.push_str(COUNTER_TABLE);
            self.buf
                .push_str(Decimal::new(u64::from(sets.get())).as_str());
            self.buf.push(':');
            self.prefix_len = self.buf.len();
            self.sets = sets.get();
        }
        self.buf.truncate(self.prefix_len);
        self.buf.push_str(Decimal::new(u64::from(index)).as_str());
        &self.buf
    }
}

/// Key that says table `sets` has been fully created.
pub fn ready_key(sets: NonZeroU32) -> String {
    table_ready_key(COUNTER_TABLE, sets)
}

/// [`set_key`] in the table named `table` (a key prefix ending with `:`; another table of
/// sets, e.g. the bypass lookup budgets, uses another name).
pub fn table_set_key(out: &mut String, table: &str, sets: NonZeroU32, index: u32) {
    out.clear();
    out.push_str(table);
    out.push_str(Decimal::new(u64::from(sets.get())).as_str());
    out.push(':');
    out.push_str(Decimal::new(u64::from(index)).as_str());
}

/// [`ready_key`] of the table named `table`.
pub fn table_ready_key(table: &str, sets: NonZeroU32) -> String {
    format!("{table}{sets}:ready")
}

/// The one get → decide → set-with-CAS loop, for every kind of shared record (counter sets,
/// user-cache slots, the bypass roles and their refresh lease).
///
/// `step` sees the record's current bytes and says what to write; a write goes with the CAS
/// of that very read, so a record changed in between by another worker is read again and
/// `step` runs again on the new value (at most [`MAX_CAS_ATTEMPTS`] times). `step` must
/// therefore be a pure function of the bytes it is given.
///
/// A missing key (only if its table was never created; tables are created at configure
/// time) is first created holding [`EMPTY`], with cas 0, and then read again: cas 0 is only
/// ever used for that placeholder, never for a real update, so no count can be lost to it.
pub fn update<S, W, T>(
    store: &S,
    key: &str,
    buf: &mut Vec<u8>,
    mut step: impl FnMut(&[u8]) -> Step<W, T>,
) -> Updated<T>
where
    S: SharedStore + ?Sized,
    W: AsRef<[u8]>,
{
    let mut retries = 0;
    let failed = |e, retries| Updated {
        result: Err(e),
        retries,
    };
    for _ in 0..MAX_CAS_ATTEMPTS {
        let cas = match store.get(key, buf) {
            Ok(Some(cas)) => cas,
            Ok(None) => {
                if let Err(e) = store.set(key, EMPTY, 0) {
                    return failed(e, retries);
                }
                continue;
            }
            Err(e) => return failed(e, retries),
        };
        let (write, answer) = match step(buf) {
            Step::Keep(answer) => {
                return Updated {
                    result: Ok(answer),
                    retries,
                }
            }
            Step::Write(write, answer) => (write, answer),
        };
        match store.set(key, write.as_ref(), cas) {
            Ok(()) => {
                return Updated {
                    result: Ok(answer),
                    retries,
                }
            }
            Err(StoreError::CasMismatch) => retries += 1,
            Err(e) => return failed(e, retries),
        }
    }
    failed(StoreError::CasMismatch, retries)
}

/// Creates `key` holding `initial` if it does not exist; never touches an existing value.
/// Returns whether it created the key.
pub fn create_if_missing<S: SharedStore + ?Sized>(
    store: &S,
    key: &str,
    initial: &[u8],
    buf: &mut Vec<u8>,
) -> Result<bool, StoreError> {
    if store.get(key, buf)?.is_some() {
        return Ok(false);
    }
    store.set(key, initial, 0)?;
    Ok(true)
}

/// Creates the missing keys of a table of `sets` sets; never touches an existing key, so a
/// configuration push (whose `on_configure` runs beside live traffic, even for a config Envoy
/// then rejects) keeps every count. Returns how many keys it created.
pub fn ensure_table<S: SharedStore>(store: &S, sets: NonZeroU32) -> Result<u32, StoreError> {
    ensure_table_in(store, COUNTER_TABLE, sets)
}

/// [`ensure_table`] for the table named `table`.
pub fn ensure_table_in<S: SharedStore>(
    store: &S,
    table: &str,
    sets: NonZeroU32,
) -> Result<u32, StoreError> {
    let ready = table_ready_key(table, sets);
    let mut buf = Vec::new();
    if store.get(&ready, &mut buf)?.is_some() {
        return Ok(0);
    }
    let mut created = 0;
    let mut key = String::new();
    for index in 0..sets.get() {
        table_set_key(&mut key, table, sets, index);
        if create_if_missing(store, &key, EMPTY, &mut buf)? {
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
        /// Every call fails with this (a host status the filter does not expect).
        pub broken: RefCell<Option<StoreError>>,
    }

    impl SharedStore for MemoryStore {
        fn get(&self, key: &str, buf: &mut Vec<u8>) -> Result<Option<u32>, StoreError> {
            if let Some(e) = *self.broken.borrow() {
                return Err(e);
            }
            buf.clear();
            Ok(self.map.borrow().get(key).map(|(v, cas)| {
                buf.extend_from_slice(v);
                *cas
            }))
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
            if let Some(e) = *self.broken.borrow() {
                return Err(e);
            }
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

    #[test]
    fn tables_of_the_same_size_with_other_names_are_other_tables() {
        let store = MemoryStore::default();
        assert_eq!(ensure_table(&store, sets(2)).unwrap(), 2);
        assert_eq!(ensure_table_in(&store, "rlrc1:lb:", sets(2)).unwrap(), 2);
        let mut keys: Vec<String> = store.map.borrow().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "rlrc1:2:0",
                "rlrc1:2:1",
                "rlrc1:2:ready",
                "rlrc1:lb:2:0",
                "rlrc1:lb:2:1",
                "rlrc1:lb:2:ready"
            ]
        );
    }

    #[test]
    fn a_reused_set_key_is_set_key() {
        let mut reused = SetKey::default();
        for (n, index) in [
            (4, 2),
            (4, 3),
            (4, 0),
            (12_500, 12_499),
            (12_500, 7),
            (1, 0),
            (4, 3),
        ] {
            let mut fresh = String::new();
            set_key(&mut fresh, sets(n), index);
            assert_eq!(reused.of(sets(n), index), fresh);
        }
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

    /// A one-byte counter record: the step adds one, or keeps the value once it reaches 3.
    fn bump(bytes: &[u8]) -> Step<[u8; 1], u8> {
        let n = bytes.first().copied().unwrap_or(0);
        if n >= 3 {
            Step::Keep(n)
        } else {
            Step::Write([n + 1], n + 1)
        }
    }

    #[test]
    fn update_retries_cas_mismatch_then_writes_once() {
        let store = MemoryStore::default();
        store.set("k", &[0], 0).unwrap();
        *store.contend.borrow_mut() = 3;
        let r = update(&store, "k", &mut Vec::new(), bump);
        assert_eq!(
            r,
            Updated {
                result: Ok(1),
                retries: 3
            }
        );
        assert_eq!(store.map.borrow()["k"].0, [1]);
    }

    #[test]
    fn keep_writes_nothing() {
        let store = MemoryStore::default();
        store.set("k", &[3], 0).unwrap();
        let cas = store.map.borrow()["k"].1;
        let r = update(&store, "k", &mut Vec::new(), bump);
        assert_eq!(r.result, Ok(3));
        assert_eq!(store.map.borrow()["k"].1, cas);
    }

    #[test]
    fn endless_contention_gives_up_after_bounded_attempts() {
        let store = MemoryStore::default();
        store.set("k", &[0], 0).unwrap();
        *store.contend.borrow_mut() = u32::MAX;
        let r = update(&store, "k", &mut Vec::new(), bump);
        assert_eq!(r.result, Err(StoreError::CasMismatch));
        assert_eq!(r.retries, MAX_CAS_ATTEMPTS);
    }

    #[test]
    fn missing_key_is_created_empty_then_updated_with_a_real_cas() {
        let store = MemoryStore::default();
        let mut seen = Vec::new();
        let r = update(&store, "k", &mut Vec::new(), |bytes| {
            seen.push(bytes.to_vec());
            bump(bytes)
        });
        assert_eq!(r.result, Ok(1));
        assert_eq!(seen, [EMPTY.to_vec()]);
    }

    #[test]
    fn host_errors_end_the_loop() {
        let store = MemoryStore::default();
        store.set("k", &[0], 0).unwrap();
        *store.broken.borrow_mut() = Some(StoreError::Host(2));
        let r = update(&store, "k", &mut Vec::new(), bump);
        assert_eq!(r.result, Err(StoreError::Host(2)));
        assert!(create_if_missing(&store, "j", EMPTY, &mut Vec::new()).is_err());
    }
}
