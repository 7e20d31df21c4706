//! The replica-wide backend (SPEC §10), free of proxy-wasm: what a counted request asks the
//! Rate Limit Service, what its answer means, and the per-VM queue that keeps at most one
//! engine call in flight per bucket.
//!
//! **What the engine sees.** One descriptor per request, in the configured domain:
//! `client` = the client IP, `route` = the route bucket (the normalised path or the
//! pattern, `%XX`-escaped outside printable ASCII), `method`, and `window` = the start of the
//! filter's own aligned window (SPEC §4.2) in epoch milliseconds; with the limit override
//! `requests_per_unit` = L and the smallest `unit` whose clock-aligned window holds the
//! filter's window ([`rls::unit_for_window`]). Every filter window is therefore its own
//! engine key, and the engine counts exactly the filter's windows whatever the interval
//! (1 s, 3 s, 5 s, 10 s, 60 s in Rocket.Chat's preset) without any configuration but the
//! domain.
//!
//! **Floods stay local.** Within a fixed window a count never goes down, so an OVER_LIMIT
//! answer holds until the window's reset: the adapter marks the bucket exhausted in its
//! counter set (shared by every worker of the replica) and answers later requests with the
//! 429 without a call. Within a VM, a bucket has at most one call in flight ([`Queue`]); the
//! other requests of that bucket wait their turn, each within its own deadline, so a flood
//! reaches the engine at most L + (one per worker) times per replica and window.

use std::collections::{BTreeMap, VecDeque};

use crate::decision::Countable;
use crate::limiter::window_end;
use crate::response::Decimal;
use crate::rls::{self, Code, Descriptor};

/// The `ShouldRateLimit` message for one request of `countable`'s bucket.
pub fn engine_request(
    domain: &str,
    client_ip: &[u8],
    method: &[u8],
    bucket: &[u8],
    countable: &Countable,
    now_ms: u64,
) -> Vec<u8> {
    let interval_ms = countable.limit.interval_ms.get();
    let start_ms = window_end(now_ms, countable.limit.interval_ms).saturating_sub(interval_ms);
    let mut client = String::with_capacity(client_ip.len());
    rls::escape_value(client_ip, &mut client);
    let mut route = String::with_capacity(bucket.len());
    rls::escape_value(bucket, &mut route);
    let mut verb = String::with_capacity(method.len());
    rls::escape_value(method, &mut verb);
    let window = Decimal::new(start_ms);
    let entries = [
        ("client", client.as_str()),
        ("route", route.as_str()),
        ("method", verb.as_str()),
        ("window", window.as_str()),
    ];
    rls::encode_request(
        domain,
        &Descriptor {
            entries: &entries,
            requests_per_unit: countable.limit.requests.get(),
            unit: rls::unit_for_window(start_ms, interval_ms),
        },
    )
}

/// What the engine's answer means for the request that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted and admitted; `x-ratelimit-remaining` is the engine's `limit_remaining`.
    Admit { remaining: u32 },
    /// Over the limit until the window's reset.
    OverLimit,
    /// No usable answer: follow `on_failure`.
    Failed,
}

/// Reads an answer to [`engine_request`] for a limit of `requests`. Anything but one
/// descriptor status that carries our limit (an engine that does not serve the domain
/// answers OK without one, and would otherwise admit everything) is a failure.
pub fn verdict(message: &[u8], requests: u32) -> Verdict {
    let Some(answer) = rls::decode_answer(message) else {
        return Verdict::Failed;
    };
    let [status] = answer.statuses.as_slice() else {
        return Verdict::Failed;
    };
    if status.requests_per_unit != Some(requests) {
        return Verdict::Failed;
    }
    match (status.code, answer.overall) {
        (Code::OverLimit, _) | (_, Code::OverLimit) => Verdict::OverLimit,
        (Code::Ok, Code::Ok) => Verdict::Admit {
            remaining: status.limit_remaining.min(requests.saturating_sub(1)),
        },
        _ => Verdict::Failed,
    }
}

/// A request waiting for (or making) its bucket's engine call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub context_id: u32,
    pub countable: Countable,
    /// The request's `ShouldRateLimit` message.
    pub message: Vec<u8>,
    /// The end of the window the message asks about (the `x-ratelimit-reset` to send).
    pub reset_ms: u64,
    /// The request must have its answer by then (`timeout_ms` after it arrived).
    pub deadline_ms: u64,
}

/// What to do with the requests queued behind a call that ended.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Next {
    /// The request whose call goes out now (with the time left before its deadline).
    pub dispatch: Option<Waiting>,
    /// Requests answered with the 429 from the over-limit verdict.
    pub reject: Vec<Waiting>,
    /// Requests that follow `on_failure` (the engine failed, or their deadline passed).
    pub fall_back: Vec<Waiting>,
}

/// Per-VM: the buckets with an engine call in flight, and the requests queued behind each.
#[derive(Debug, Default)]
pub struct Queue {
    buckets: BTreeMap<u64, VecDeque<Waiting>>,
}

impl Queue {
    /// A request of bucket `fingerprint` needs the engine: `Some` (dispatch it now) when no
    /// call of that bucket is in flight here, else it is queued (`None`).
    pub fn arrive(&mut self, fingerprint: u64, waiting: Waiting) -> Option<Waiting> {
        match self.buckets.get_mut(&fingerprint) {
            Some(queue) => {
                queue.push_back(waiting);
                None
            }
            None => {
                self.buckets.insert(fingerprint, VecDeque::new());
                Some(waiting)
            }
        }
    }

    /// The call of bucket `fingerprint` ended with `verdict` at `now_ms`.
    pub fn ended(&mut self, fingerprint: u64, verdict: Verdict, now_ms: u64) -> Next {
        let Some(mut queue) = self.buckets.remove(&fingerprint) else {
            return Next::default();
        };
        let mut next = Next::default();
        match verdict {
            Verdict::OverLimit => next.reject.extend(queue),
            Verdict::Failed => next.fall_back.extend(queue),
            Verdict::Admit { .. } => {
                while let Some(w) = queue.pop_front() {
                    if w.deadline_ms > now_ms {
                        next.dispatch = Some(w);
                        break;
                    }
                    next.fall_back.push(w);
                }
                if next.dispatch.is_some() {
                    self.buckets.insert(fingerprint, queue);
                }
            }
        }
        next
    }

    /// Another call of this bucket could not even be dispatched: like a failed call.
    pub fn dispatch_failed(&mut self, fingerprint: u64) -> Vec<Waiting> {
        self.ended(fingerprint, Verdict::Failed, 0).fall_back
    }

    /// A queued request went away.
    pub fn forget(&mut self, context_id: u32) {
        for queue in self.buckets.values_mut() {
            queue.retain(|w| w.context_id != context_id);
        }
    }

    /// Requests waiting right now (not counting the ones whose call is in flight).
    pub fn queued(&self) -> usize {
        self.buckets.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;
    use crate::limiter::Limit;

    fn countable(requests: u32, interval_ms: u64) -> Countable {
        Countable {
            limit: Limit::of(requests, interval_ms),
            fingerprint: 77,
            set: 0,
        }
    }

    fn waiting(context_id: u32, deadline_ms: u64) -> Waiting {
        Waiting {
            context_id,
            countable: countable(10, 60_000),
            message: vec![context_id as u8],
            reset_ms: 60_000,
            deadline_ms,
        }
    }

    #[test]
    fn the_engine_sees_the_bucket_and_the_filters_window() {
        let msg = engine_request(
            "rocketchat",
            b"10.0.0.7",
            b"POST",
            b"/api/v1/rooms/:/x",
            &countable(3, 5_000),
            1_700_000_003_456,
        );
        let entries = [
            ("client", "10.0.0.7"),
            ("route", "/api/v1/rooms/:/x"),
            ("method", "POST"),
            ("window", "1700000000000"),
        ];
        let expected = rls::encode_request(
            "rocketchat",
            &Descriptor {
                entries: &entries,
                requests_per_unit: 3,
                unit: rls::Unit::Minute,
            },
        );
        assert_eq!(msg, expected);
    }

    fn answer(overall: u8, code: u8, requests: u8, remaining: u8) -> Vec<u8> {
        let status = [
            0x08, code, 0x12, 4, 0x08, requests, 0x10, 2, 0x18, remaining,
        ];
        let mut m = vec![0x08, overall, 0x12, status.len() as u8];
        m.extend_from_slice(&status);
        m
    }

    #[test]
    fn answers_become_verdicts() {
        assert_eq!(
            verdict(&answer(1, 1, 10, 4), 10),
            Verdict::Admit { remaining: 4 }
        );
        assert_eq!(verdict(&answer(2, 2, 10, 0), 10), Verdict::OverLimit);
        // Not our limit (an engine config that overrides it, or none at all): unusable.
        assert_eq!(verdict(&answer(1, 1, 20, 4), 10), Verdict::Failed);
        assert_eq!(verdict(&[0x08, 1, 0x12, 2, 0x08, 1], 10), Verdict::Failed);
        assert_eq!(verdict(&[0x08, 1], 10), Verdict::Failed);
        assert_eq!(verdict(b"garbage", 10), Verdict::Failed);
        // remaining never above L - 1 for an admitted request.
        assert_eq!(
            verdict(&answer(1, 1, 10, 99), 10),
            Verdict::Admit { remaining: 9 }
        );
    }

    #[test]
    fn one_call_per_bucket_the_rest_wait_their_turn() {
        let mut q = Queue::default();
        assert_eq!(q.arrive(77, waiting(1, 100)), Some(waiting(1, 100)));
        assert_eq!(q.arrive(77, waiting(2, 110)), None);
        assert_eq!(q.arrive(77, waiting(3, 120)), None);
        assert_eq!(q.arrive(88, waiting(4, 120)), Some(waiting(4, 120)));
        assert_eq!(q.queued(), 2);
        // Admitted at 112: request 2 ran out of time (falls back), request 3 goes next.
        let next = q.ended(77, Verdict::Admit { remaining: 5 }, 112);
        assert_eq!(next.dispatch, Some(waiting(3, 120)));
        assert_eq!(next.fall_back, vec![waiting(2, 110)]);
        assert_eq!(q.arrive(77, waiting(5, 200)), None);
        // Over the limit: everyone queued gets the 429 without a call.
        let next = q.ended(77, Verdict::OverLimit, 130);
        assert_eq!(next.reject, vec![waiting(5, 200)]);
        assert_eq!(next.dispatch, None);
        assert_eq!(q.arrive(77, waiting(6, 300)), Some(waiting(6, 300)));
    }

    #[test]
    fn a_failed_call_sends_the_queue_to_on_failure_at_once() {
        let mut q = Queue::default();
        q.arrive(77, waiting(1, 100));
        q.arrive(77, waiting(2, 100));
        q.arrive(77, waiting(3, 100));
        q.forget(3);
        let next = q.ended(77, Verdict::Failed, 50);
        assert_eq!(next.fall_back, vec![waiting(2, 100)]);
        assert_eq!(q.queued(), 0);
        assert_eq!(q.ended(77, Verdict::Failed, 50), Next::default());
    }
}
