//! The bypass lookup protocol over shared data (SPEC §5.2, §5.5), free of proxy-wasm: each
//! function is an update step for [`crate::store::update`], a pure function of the record's
//! current bytes, so the one CAS loop applies it; and the per-VM copy of answers.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64};

use crate::bypass::{self, CacheState, SharedRoles};
use crate::fingerprint::{fingerprint, Seed};
use crate::limiter::{self, Limit, Set, Verdict, SET_BYTES};
use crate::store::{Step, EMPTY};

// ---------------------------------------------------------------------------------------------
// The lookup budget (SPEC §11 `bypass.lookups_per_client_per_minute`): a client that sends a
// new token with every request would otherwise cause one `me` call per request, turning the
// gateway into an amplifier onto Rocket.Chat's database. Each client (its masked address) may
// cause at most N lookups (cache misses) per aligned minute, counted in a table of counter sets
// of its own, shared by all workers and bounded like the client counters (Envoy never deletes
// a key): the same sets, the same `limiter::decide`, the same CAS loop.

/// Name of the lookup-budget table.
pub const BUDGET_TABLE: &str = "rlrc1:lb:";
/// Its size: 2,048 sets of 8, 16,384 clients looking users up in one minute before two share
/// a budget (counted conservatively, like the client counters of a full table).
pub const BUDGET_SETS: NonZeroU32 = NonZeroU32::MIN.saturating_add(2047);
/// A budget's window.
pub const BUDGET_WINDOW_MS: NonZeroU64 = NonZeroU64::MIN.saturating_add(59_999);

/// The budget of `client` (the masked client address of SPEC §11): its fingerprint, apart
/// from every route bucket (no route has an empty method).
pub fn budget_fingerprint(seed: Seed, client: &[u8]) -> u64 {
    fingerprint(seed, client, b"", b"me lookups")
}

/// The budget's limit: `per_minute` lookups per aligned minute.
pub fn budget_limit(per_minute: u32) -> Option<Limit> {
    Limit::new(per_minute, BUDGET_WINDOW_MS.get())
}

/// Spends one lookup of the budget `budget_fp` (its set's current bytes in `bytes`): `true`
/// if the client had one left, `false` if its lookups of this minute are used up.
pub fn spend_lookup(
    bytes: &[u8],
    budget_fp: u64,
    limit: Limit,
    now_ms: u64,
) -> Step<[u8; SET_BYTES], bool> {
    let decision = limiter::decide(&Set::decode(bytes), budget_fp, limit, now_ms);
    let allowed = matches!(decision.verdict, Verdict::Allowed { .. });
    match decision.write {
        Some(next) => Step::Write(next.encode(), allowed),
        None => Step::Keep(allowed),
    }
}

/// What a request with credentials learns from one read of its user-cache slot, before it
/// spends any budget: the same answers as [`claim`], where `Ask` means "a miss" (nothing is
/// written yet).
pub fn peek(bytes: &[u8], user_fp: u64, now_ms: u64, looking_up_here: bool) -> Claim {
    match claim(bytes, user_fp, now_ms, 0, looking_up_here) {
        Step::Keep(seen) => seen,
        Step::Write(_, seen) => seen,
    }
}

/// What a request with credentials learns from its user-cache slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// A fresh answer: the user's roles, until `expires_ms`.
    Known { roles: Vec<String>, expires_ms: u64 },
    /// A lookup of this user is under way (here or on another worker): park on it.
    Wait,
    /// Nobody asks yet: this request wrote the pending marker and dispatches the callout.
    Ask,
}

/// The step of a request whose user no local copy answers. `looking_up_here`: this VM
/// already runs a lookup of the user (its marker may have been overwritten by a colliding
/// user: wait for it rather than asking twice).
pub fn claim(
    bytes: &[u8],
    user_fp: u64,
    now_ms: u64,
    deadline_ms: u64,
    looking_up_here: bool,
) -> Step<Vec<u8>, Claim> {
    match bypass::read_slot(bytes, user_fp, now_ms) {
        CacheState::Roles { roles, expires_ms } => Step::Keep(Claim::Known { roles, expires_ms }),
        CacheState::Pending => Step::Keep(Claim::Wait),
        CacheState::Miss if looking_up_here => Step::Keep(Claim::Wait),
        CacheState::Miss => Step::Write(bypass::pending_slot(user_fp, deadline_ms), Claim::Ask),
    }
}

/// Stores an answer (`value`, from [`bypass::resolved_slot`]) over our own pending marker, an
/// empty slot or an expired entry; never over another caller's live entry.
pub fn store_answer<'v>(
    bytes: &[u8],
    user_fp: u64,
    now_ms: u64,
    value: &'v [u8],
) -> Step<&'v [u8], ()> {
    if bypass::may_store_answer(bytes, user_fp, now_ms) {
        Step::Write(value, ())
    } else {
        Step::Keep(())
    }
}

/// Removes our pending marker after a failed lookup, so that the next request asks again.
pub fn clear_pending(bytes: &[u8], user_fp: u64) -> Step<&'static [u8], ()> {
    if bypass::is_pending_for(bytes, user_fp) {
        Step::Write(EMPTY, ())
    } else {
        Step::Keep(())
    }
}

/// Takes the permissions-refresh lease when a refresh is due and no other VM holds it.
/// Answers whether this VM now holds it (and must dispatch the callout).
pub fn take_refresh_lease(
    bytes: &[u8],
    now_ms: u64,
    refresh_interval_ms: u64,
    lease_until_ms: u64,
) -> Step<Vec<u8>, bool> {
    let mut shared = SharedRoles::decode(bytes);
    if !shared.refresh_due(now_ms, refresh_interval_ms) {
        return Step::Keep(false);
    }
    shared.lease_until_ms = lease_until_ms;
    Step::Write(shared.encode(), true)
}

/// Records the outcome of a permissions refresh: the new roles (and the lease released), or,
/// after a failure, the lease held until `retry_at_ms` so that no VM asks again before then.
pub fn record_refresh(
    bytes: &[u8],
    now_ms: u64,
    roles: Option<&[String]>,
    retry_at_ms: u64,
) -> Step<Vec<u8>, ()> {
    let mut shared = SharedRoles::decode(bytes);
    match roles {
        Some(roles) => {
            shared.roles = Some(roles.to_vec());
            shared.fetched_ms = now_ms;
            shared.lease_until_ms = 0;
        }
        None => shared.lease_until_ms = retry_at_ms,
    }
    Step::Write(shared.encode(), ())
}

/// Entries of the per-VM answer copy; when full it starts over (the shared cache still holds
/// every answer).
pub const LOCAL_ANSWERS: usize = 4096;

/// This VM's copy of the answers it has seen (user fingerprint → expiry, roles), so that a
/// repeat caller costs no shared-data read. Same expiry as the shared entry; the roles (not
/// the verdict) are kept, so a change of the bypass roles applies at once.
#[derive(Debug, Default)]
pub struct LocalAnswers {
    answers: BTreeMap<u64, (u64, Vec<String>)>,
}

impl LocalAnswers {
    /// Does the user bypass, if this VM knows a fresh answer?
    pub fn is_bypass(&self, user_fp: u64, now_ms: u64, bypass_roles: &[String]) -> Option<bool> {
        let (expires_ms, roles) = self.answers.get(&user_fp)?;
        (*expires_ms > now_ms).then(|| bypass::is_bypass(roles, bypass_roles))
    }

    pub fn remember(&mut self, user_fp: u64, expires_ms: u64, roles: Vec<String>) {
        if self.answers.len() >= LOCAL_ANSWERS {
            self.answers.clear();
        }
        self.answers.insert(user_fp, (expires_ms, roles));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::{update, SharedStore};

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// Two workers' requests for one user: the first claims the slot and asks, the second
    /// waits; the answer lands over the marker; a third request finds it.
    #[test]
    fn first_caller_asks_the_next_wait_and_the_answer_is_found() {
        let store = MemoryStore::default();
        store.set("u", EMPTY, 0).unwrap();
        let mut buf = Vec::new();
        let first = update(&store, "u", &mut buf, |b| claim(b, 42, 10, 310, false));
        assert_eq!(first.result, Ok(Claim::Ask));
        let second = update(&store, "u", &mut buf, |b| claim(b, 42, 20, 320, false));
        assert_eq!(second.result, Ok(Claim::Wait));
        let value = bypass::resolved_slot(42, 60_010, &s(&["bot"]));
        let stored = update(&store, "u", &mut buf, |b| store_answer(b, 42, 30, &value));
        assert_eq!(stored.result, Ok(()));
        let third = update(&store, "u", &mut buf, |b| claim(b, 42, 40, 340, false));
        assert_eq!(
            third.result,
            Ok(Claim::Known {
                roles: s(&["bot"]),
                expires_ms: 60_010
            })
        );
    }

    /// SPEC §11: N lookups per client per aligned minute, shared by every worker through the
    /// one CAS loop; another client has its own budget; the next minute gives them back.
    #[test]
    fn a_client_spends_at_most_its_lookups_of_the_minute() {
        let store = MemoryStore::default();
        crate::store::ensure_table_in(&store, BUDGET_TABLE, BUDGET_SETS).unwrap();
        let seed = Seed(3, 4);
        let limit = budget_limit(3).unwrap();
        let mut key = String::new();
        let mut spend = |client: &[u8], now_ms: u64| {
            let fp = budget_fingerprint(seed, client);
            crate::store::table_set_key(
                &mut key,
                BUDGET_TABLE,
                BUDGET_SETS,
                limiter::set_index(fp, BUDGET_SETS),
            );
            update(&store, &key, &mut Vec::new(), |b| {
                spend_lookup(b, fp, limit, now_ms)
            })
            .result
            .unwrap()
        };
        let minute = 1_700_000_040_000;
        let got: Vec<bool> = (0..5).map(|i| spend(b"10.0.0.1", minute + i)).collect();
        assert_eq!(got, [true, true, true, false, false]);
        assert!(spend(b"2001:db8:1:2::/64", minute + 5));
        assert!(!spend(b"10.0.0.1", minute + 59_999));
        assert!(spend(b"10.0.0.1", minute + 60_000));
        assert_ne!(
            budget_fingerprint(seed, b"10.0.0.1"),
            crate::fingerprint::fingerprint(seed, b"10.0.0.1", b"GET", b"/api/v1/me")
        );
        assert!(budget_limit(0).is_none());
    }

    #[test]
    fn a_peek_writes_nothing_and_tells_a_miss_from_a_hit() {
        assert_eq!(peek(EMPTY, 42, 10, false), Claim::Ask);
        assert_eq!(peek(EMPTY, 42, 10, true), Claim::Wait);
        assert_eq!(
            peek(&bypass::pending_slot(42, 300), 42, 10, false),
            Claim::Wait
        );
        let answer = bypass::resolved_slot(42, 300, &s(&["bot"]));
        assert_eq!(
            peek(&answer, 42, 10, false),
            Claim::Known {
                roles: s(&["bot"]),
                expires_ms: 300
            }
        );
        assert_eq!(peek(&answer, 7, 10, false), Claim::Ask);
    }

    #[test]
    fn an_answer_never_replaces_another_callers_live_entry() {
        let other = bypass::resolved_slot(7, 1_000, &s(&["admin"]));
        let mine = bypass::resolved_slot(42, 1_000, &[]);
        assert_eq!(store_answer(&other, 42, 10, &mine), Step::Keep(()));
        assert_eq!(
            store_answer(&other, 42, 1_000, &mine),
            Step::Write(&mine[..], ())
        );
        assert_eq!(
            store_answer(EMPTY, 42, 10, &mine),
            Step::Write(&mine[..], ())
        );
    }

    #[test]
    fn only_our_own_marker_is_cleared() {
        let marker = bypass::pending_slot(42, 300);
        assert_eq!(clear_pending(&marker, 42), Step::Write(EMPTY, ()));
        assert_eq!(clear_pending(&marker, 7), Step::Keep(()));
        let answer = bypass::resolved_slot(42, 300, &[]);
        assert_eq!(clear_pending(&answer, 42), Step::Keep(()));
    }

    #[test]
    fn a_lookup_running_here_is_waited_for_even_if_its_marker_was_lost() {
        assert_eq!(claim(EMPTY, 42, 10, 300, true), Step::Keep(Claim::Wait));
    }

    #[test]
    fn one_vm_holds_the_refresh_lease_and_a_failure_holds_it_until_the_retry() {
        let store = MemoryStore::default();
        store.set("p", &SharedRoles::default().encode(), 0).unwrap();
        let mut buf = Vec::new();
        let take = |now| move |b: &[u8]| take_refresh_lease(b, now, 60_000, now + 300);
        assert_eq!(update(&store, "p", &mut buf, take(0)).result, Ok(true));
        assert_eq!(update(&store, "p", &mut buf, take(10)).result, Ok(false));
        // The answer failed: nobody retries before 5 s.
        update(&store, "p", &mut buf, |b| {
            record_refresh(b, 20, None, 5_020)
        });
        assert_eq!(update(&store, "p", &mut buf, take(5_000)).result, Ok(false));
        assert_eq!(update(&store, "p", &mut buf, take(5_020)).result, Ok(true));
        let roles = s(&["admin", "bot"]);
        update(&store, "p", &mut buf, |b| {
            record_refresh(b, 5_030, Some(&roles), 0)
        });
        store.get("p", &mut buf).unwrap();
        let shared = SharedRoles::decode(&buf);
        assert_eq!(shared.roles, Some(roles));
        assert_eq!(shared.lease_until_ms, 0);
        // Fresh now: no refresh until the interval has passed.
        assert_eq!(update(&store, "p", &mut buf, take(6_000)).result, Ok(false));
        assert_eq!(update(&store, "p", &mut buf, take(65_030)).result, Ok(true));
    }

    #[test]
    fn local_answers_expire_and_follow_the_bypass_roles() {
        let mut local = LocalAnswers::default();
        local.remember(42, 100, s(&["bot"]));
        assert_eq!(local.is_bypass(42, 99, &s(&["admin", "bot"])), Some(true));
        assert_eq!(local.is_bypass(42, 99, &s(&["admin"])), Some(false));
        assert_eq!(local.is_bypass(42, 100, &s(&["bot"])), None);
        assert_eq!(local.is_bypass(7, 0, &s(&["bot"])), None);
        for fp in 0..LOCAL_ANSWERS as u64 {
            local.remember(1_000 + fp, 100, vec![]);
        }
        assert!(local.answers.len() <= LOCAL_ANSWERS);
    }
}
