//! Requests paused while a bypass lookup runs (SPEC §5.3, §5.6), free of proxy-wasm.
//!
//! A request with credentials that no cache answers is *parked* (its filter returned Pause)
//! on the lookup of its user: a `me` callout this VM dispatched, or one that another worker
//! runs (its pending marker is in the shared user cache). The lookup ends when its callout
//! answers, when the tick sees the other worker's answer (or its marker gone) in shared data,
//! or when its deadline passes. Every request parked on it is then finished with the same
//! answer, in arrival order. A request that goes away while parked is forgotten; the lookup
//! goes on, and its answer is cached for the next request.

use std::collections::BTreeMap;

/// How a lookup ended for the requests waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The user holds a bypass role: let the requests through uncounted.
    Bypass,
    /// A definite answer without a bypass role: count the requests.
    NoBypass,
    /// No usable answer (SPEC §5.6): count the requests, and say so in a metric.
    Failed,
}

impl Answer {
    pub fn from_roles(is_bypass: bool) -> Answer {
        if is_bypass {
            Answer::Bypass
        } else {
            Answer::NoBypass
        }
    }
}

/// What the shared user-cache slot says about a lookup that another worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The answer is there.
    Answered(Answer),
    /// Still pending.
    Pending,
    /// Neither: the other worker's lookup failed (it cleared its marker) or was lost.
    Gone,
}

#[derive(Debug)]
struct Lookup {
    /// Parked requests (context ids), in arrival order.
    waiters: Vec<u32>,
    /// After this, the lookup counts as failed.
    deadline_ms: u64,
    /// This VM dispatched the callout (its answer arrives here); otherwise the tick polls
    /// the shared slot.
    dispatched_here: bool,
}

/// The parked requests and running lookups of one VM; `T` is what a parked request is to be
/// counted as once its lookup ends.
#[derive(Debug)]
pub struct Parking<T> {
    lookups: BTreeMap<u64, Lookup>,
    parked: BTreeMap<u32, T>,
}

impl<T> Default for Parking<T> {
    fn default() -> Self {
        Parking {
            lookups: BTreeMap::new(),
            parked: BTreeMap::new(),
        }
    }
}

impl<T> Parking<T> {
    /// Is a lookup of this user (by its fingerprint) already running on this VM?
    pub fn is_looking_up(&self, user_fp: u64) -> bool {
        self.lookups.contains_key(&user_fp)
    }

    /// Parks request `context_id` on the lookup of `user_fp`, starting that lookup if none
    /// runs. `dispatched_here`: this request's own callout is the lookup.
    pub fn park(
        &mut self,
        context_id: u32,
        user_fp: u64,
        parked: T,
        deadline_ms: u64,
        dispatched_here: bool,
    ) {
        self.parked.insert(context_id, parked);
        let lookup = self.lookups.entry(user_fp).or_insert(Lookup {
            waiters: Vec::new(),
            deadline_ms,
            dispatched_here,
        });
        if dispatched_here {
            lookup.dispatched_here = true;
            lookup.deadline_ms = deadline_ms;
        }
        lookup.waiters.push(context_id);
    }

    /// Ends the lookup of `user_fp`: the requests still parked on it, in arrival order, each
    /// with what it is to be counted as.
    pub fn finish(&mut self, user_fp: u64) -> Vec<(u32, T)> {
        let Some(lookup) = self.lookups.remove(&user_fp) else {
            return Vec::new();
        };
        lookup
            .waiters
            .into_iter()
            .filter_map(|id| self.parked.remove(&id).map(|c| (id, c)))
            .collect()
    }

    /// The lookups that have ended by `now_ms`, as seen on a tick: this VM's own callouts past
    /// their deadline (failed), and other workers' lookups whose slot `seen` reports answered
    /// or gone, or that are past their deadline.
    pub fn ended(&self, now_ms: u64, mut seen: impl FnMut(u64) -> Seen) -> Vec<(u64, Answer)> {
        let mut ended = Vec::new();
        for (user_fp, lookup) in &self.lookups {
            let late = now_ms >= lookup.deadline_ms;
            if lookup.dispatched_here {
                if late {
                    ended.push((*user_fp, Answer::Failed));
                }
                continue;
            }
            match seen(*user_fp) {
                Seen::Answered(answer) => ended.push((*user_fp, answer)),
                Seen::Pending if !late => {}
                Seen::Pending | Seen::Gone => ended.push((*user_fp, Answer::Failed)),
            }
        }
        ended
    }

    /// The request went away (client closed, stream reset): forget it.
    pub fn forget(&mut self, context_id: u32) {
        self.parked.remove(&context_id);
        for lookup in self.lookups.values_mut() {
            lookup.waiters.retain(|id| *id != context_id);
        }
    }

    /// Requests parked right now.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::decision::Countable;
    use crate::limiter::Limit;

    fn countable(n: u64) -> Countable {
        Countable {
            limit: Limit::of(10, 60_000),
            fingerprint: n,
            set: 0,
        }
    }

    #[test]
    fn one_lookup_finishes_every_request_parked_on_it_in_order() {
        let mut p = Parking::<Countable>::default();
        p.park(5, 77, countable(1), 300, true);
        p.park(6, 77, countable(2), 400, false);
        p.park(7, 88, countable(3), 300, false);
        assert!(p.is_looking_up(77));
        assert_eq!(p.finish(77), vec![(5, countable(1)), (6, countable(2))]);
        assert!(!p.is_looking_up(77));
        assert_eq!(p.finish(77), vec![]);
        assert_eq!(p.parked(), 1);
    }

    #[test]
    fn a_request_that_went_away_is_not_finished() {
        let mut p = Parking::<Countable>::default();
        p.park(5, 77, countable(1), 300, true);
        p.park(6, 77, countable(2), 300, false);
        p.forget(5);
        // The lookup goes on (its answer is cached for others) and finishes the rest.
        assert!(p.is_looking_up(77));
        assert_eq!(p.finish(77), vec![(6, countable(2))]);
    }

    #[test]
    fn own_callouts_end_at_their_deadline_others_by_their_slot() {
        let mut p = Parking::<Countable>::default();
        p.park(1, 10, countable(1), 300, true); // our callout
        p.park(2, 20, countable(2), 300, false); // answered elsewhere
        p.park(3, 30, countable(3), 300, false); // still pending elsewhere
        p.park(4, 40, countable(4), 300, false); // the other worker gave up
        let seen = |fp| match fp {
            20 => Seen::Answered(Answer::Bypass),
            30 => Seen::Pending,
            _ => Seen::Gone,
        };
        assert_eq!(
            p.ended(299, seen),
            vec![(20, Answer::Bypass), (40, Answer::Failed)]
        );
        assert_eq!(
            p.ended(300, seen),
            vec![
                (10, Answer::Failed),
                (20, Answer::Bypass),
                (30, Answer::Failed),
                (40, Answer::Failed)
            ]
        );
    }

    #[test]
    fn a_dispatch_takes_over_a_lookup_others_started() {
        let mut p = Parking::<Countable>::default();
        p.park(1, 10, countable(1), 300, false);
        p.park(2, 10, countable(2), 900, true);
        // Now our own callout: no polling, and the later deadline.
        assert_eq!(p.ended(500, |_| Seen::Gone), vec![]);
        assert_eq!(p.ended(900, |_| Seen::Gone), vec![(10, Answer::Failed)]);
    }
}
