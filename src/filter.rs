//! The adapter: translates host callbacks (`abi`) into calls of the pure modules, fetching
//! their inputs from the host (`host`) and applying what they decide. The request phase
//! decides (and counts); the response phase only adds headers.
//!
//! Bypass (SPEC §5) may need an answer from Rocket.Chat first: the request is then *parked*
//! (`parking`) until the answer arrives, on this worker or on another one, and is finished by
//! whichever code sees the answer first (the callout answer, or the root context's tick).
//! With `global` (SPEC §10) a counted request is paused until the Rate Limit Service answers
//! (`global`), and finished by that answer.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::bypass::{self, CacheState, MeAnswer, SharedRoles};
use crate::client::client_ip;
use crate::config::{self, BypassConfig, Config, GlobalConfig, OnFailure};
use crate::decision::{self, Action as Decided, Countable};
use crate::edge;
use crate::fingerprint::Seed;
use crate::global::{self, Queue, Verdict, Waiting};
use crate::headers;
use crate::host::{self, HostSharedData};
use crate::limiter::set_index;
use crate::limiter::window_end;
use crate::lookup::{self, Claim, LocalAnswers};
use crate::metrics::GAUGE_TRACKED_CLIENTS;
use crate::metrics::{Counter, Events, PendingMetrics, Throttle, COUNTER_NAMES};
use crate::parking::{Answer, Parking, Seen};
use crate::response::{self, too_many_requests, Formatted, Ietf, RateLimitHeaders};
use crate::rls;
use crate::store::{self, SetKey, SharedStore, StoreError, Updated};
use crate::verdicts::Exhausted;

const SEED_KEY: &str = "rlrc1:seed";
const SOURCE_ADDRESS: &[u8] = b"source\0address";
/// The TLS version of the downstream connection; absent on a plain one.
const TLS_VERSION: &[u8] = b"connection\0tls_version";
/// How often a VM with bypass on looks at lookups other workers run, and at the bypass roles
/// (and flushes its metrics).
const TICK_MS: u32 = 20;
/// How often a VM without bypass hands its batched metric counts to Envoy.
const METRICS_FLUSH_MS: u32 = 100;
/// Wait before retrying a failed permissions refresh.
const PERMISSIONS_RETRY_MS: u64 = 5_000;
/// Largest callout answer read (a `me` or `permissions.listAll` body).
const MAX_ANSWER_BYTES: usize = 4 << 20;
/// Over-limit verdicts kept locally (SPEC §10); off only in a benchmark build that measures
/// what they save.
const VERDICT_CACHE: bool = !cfg!(feature = "bench-no-verdict-cache");
/// Largest Rate Limit Service answer read (one descriptor status is a few dozen bytes).
const MAX_ENGINE_ANSWER_BYTES: usize = 64 << 10;

/// What the host does with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// Metric ids of this VM and the counts not yet handed to Envoy (see [`PendingMetrics`]).
/// One per root context, kept across configurations: requests still running on a replaced
/// configuration add to the same pending counts, which the root flushes.
struct Metrics {
    counters: [Option<u32>; COUNTER_NAMES.len()],
    tracked_clients: Option<u32>,
    pending: RefCell<PendingMetrics>,
}

impl Metrics {
    fn define() -> Metrics {
        let mut counters = [None; COUNTER_NAMES.len()];
        for (id, name) in counters.iter_mut().zip(COUNTER_NAMES) {
            *id = host::define_metric(host::METRIC_COUNTER, name);
        }
        Metrics {
            counters,
            tracked_clients: host::define_metric(host::METRIC_GAUGE, GAUGE_TRACKED_CLIENTS),
            pending: RefCell::default(),
        }
    }

    fn inc(&self, counter: Counter) {
        self.pending.borrow_mut().inc(counter);
    }

    fn record(&self, events: &Events) {
        self.pending.borrow_mut().record(events);
    }

    /// Hands the pending counts to Envoy.
    fn flush(&self) {
        let (counters, tracked) = self.pending.borrow_mut().take();
        let as_delta = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (n, id) in counters.into_iter().zip(self.counters) {
            if let (true, Some(id)) = (n > 0, id) {
                host::increment_metric(id, as_delta(n));
            }
        }
        if let (true, Some(id)) = (tracked > 0, self.tracked_clients) {
            host::increment_metric(id, as_delta(tracked));
        }
    }
}

/// The bypass state of one VM.
struct BypassRuntime {
    config: BypassConfig,
    /// The roles holding the permission, as last seen in shared data (or the configured ones).
    roles: RefCell<Vec<String>>,
    parking: RefCell<Parking<ToCount>>,
    local: RefCell<LocalAnswers>,
}

/// A request to be counted: its bucket, and with `global` its question for the engine.
#[derive(Debug, Clone)]
struct ToCount {
    countable: Countable,
    /// The `ShouldRateLimit` message and the reset of the window it asks about.
    engine: Option<(Vec<u8>, u64)>,
}

/// Where an engine question stands.
enum Asked {
    /// Paused until the engine (or its turn in the bucket's queue) answers.
    Paused,
    /// Decided at once (known over the limit, or the call could not be made).
    Done(Result<Option<RateLimitHeaders>, ()>),
}

/// Everything a configured plugin shares with its HTTP contexts (one per VM, single-threaded).
struct Active {
    config: Config,
    seed: Seed,
    metrics: Rc<Metrics>,
    bypass: Option<BypassRuntime>,
    /// Buckets with a Rate Limit Service call in flight on this VM (SPEC §10).
    engine_queue: RefCell<Queue>,
    /// Buckets this VM has seen over their limit, until their reset: a flood's requests are
    /// answered without a shared-data read or an engine call.
    exhausted: RefCell<Exhausted>,
    /// `x-ratelimit-*` values of paused requests that were finished and let through, for
    /// their response phase.
    resumed: RefCell<BTreeMap<u32, RateLimitHeaders>>,
    /// Reused for every request: the counter key and the value read from shared data.
    key_buf: RefCell<SetKey>,
    /// The limit and reset header values last formatted, reused while they stay the same.
    formatted: RefCell<Formatted>,
    value_buf: RefCell<Vec<u8>>,
    warnings: RefCell<Throttle>,
}

/// A callout this VM has in flight, by token (SPEC §5.2, §5.3).
enum Call {
    /// `GET me_path` for the user `user_fp` (its id, to check the answer's `_id`).
    Me {
        active: Rc<Active>,
        user_fp: u64,
        user_id: Vec<u8>,
    },
    /// `GET permissions_path`, the bypass roles refresh.
    Permissions { active: Rc<Active> },
    /// `ShouldRateLimit` for the request `waiting` of bucket `fingerprint`.
    Engine {
        active: Rc<Active>,
        fingerprint: u64,
        waiting: Waiting,
    },
}

thread_local! {
    static CALLS: RefCell<BTreeMap<u32, Call>> = const { RefCell::new(BTreeMap::new()) };
}

impl Active {
    fn warn(&self, now_ms: u64, message: &str) {
        if let Some(suppressed) = self.warnings.borrow_mut().allow(now_ms) {
            log::warn!("{message} ({suppressed} similar messages suppressed)");
        }
    }

    /// Counts a request in this replica's counter (on the *effective* context) and applies
    /// the verdict: the headers to add in the response phase, or the 429 sent (`Err`).
    fn count(&self, countable: &Countable, now_ms: u64) -> Result<Option<RateLimitHeaders>, ()> {
        let known = self
            .exhausted
            .borrow()
            .until(countable.fingerprint, countable.limit, now_ms);
        if let Some(reset_ms) = known {
            return self.apply(countable, self.over_limit(reset_ms), now_ms);
        }
        let (decided, events) = decision::count_request(
            &self.config,
            &HostSharedData,
            &mut self.key_buf.borrow_mut(),
            &mut self.value_buf.borrow_mut(),
            countable,
            now_ms,
        );
        self.metrics.record(&events);
        if let Decided::Reject { reset_ms } | Decided::DryRunLimited { reset_ms } = decided {
            self.remember_exhausted(countable, reset_ms, now_ms);
        }
        self.apply(countable, decided, now_ms)
    }

    fn remember_exhausted(&self, countable: &Countable, reset_ms: u64, now_ms: u64) {
        if VERDICT_CACHE {
            let mut exhausted = self.exhausted.borrow_mut();
            exhausted.remember(countable.fingerprint, countable.limit, reset_ms, now_ms);
        }
    }

    /// Applies a decision to the effective context: the headers to add in the response
    /// phase, or the 429 sent (`Err`).
    fn apply(
        &self,
        countable: &Countable,
        decided: Decided,
        now_ms: u64,
    ) -> Result<Option<RateLimitHeaders>, ()> {
        let limit = countable.limit.requests.get();
        let ietf = |reset_ms| {
            let interval_ms = countable.limit.interval_ms.get();
            self.config
                .ietf_headers
                .then(|| Ietf::new(interval_ms, reset_ms, now_ms))
        };
        let headers = |remaining, reset_ms| RateLimitHeaders {
            limit,
            remaining,
            reset_ms,
            ietf: ietf(reset_ms),
        };
        match decided {
            Decided::Pass {
                remaining,
                reset_ms,
            } => {
                self.metrics.inc(Counter::Allowed);
                Ok(Some(headers(remaining, reset_ms)))
            }
            Decided::DryRunLimited { reset_ms } => {
                self.metrics.inc(Counter::DryRunLimited);
                self.warn(now_ms, "dry run: a request over its limit was let through");
                Ok(Some(headers(0, reset_ms)))
            }
            Decided::Reject { reset_ms } => {
                self.metrics.inc(Counter::Limited);
                let reply = too_many_requests(
                    limit,
                    reset_ms,
                    now_ms,
                    self.config.retry_after,
                    ietf(reset_ms),
                );
                let sent = host::send_local_response(
                    reply.status,
                    "rocketchat_ratelimit",
                    &reply.headers,
                    reply.body.as_bytes(),
                );
                if !sent {
                    self.warn(now_ms, "Envoy refused the 429 reply");
                }
                Err(())
            }
            Decided::FailOpen => {
                self.warn(
                    now_ms,
                    "counter store failed or stayed contended; request let through",
                );
                Ok(None)
            }
        }
    }

    /// The decision for a request known to be over its limit (not counted again).
    fn over_limit(&self, reset_ms: u64) -> Decided {
        if self.config.dry_run {
            Decided::DryRunLimited { reset_ms }
        } else {
            Decided::Reject { reset_ms }
        }
    }

    /// Finishes a paused request: makes it the effective context, applies `result`, and
    /// resumes it unless a local reply was sent. `false` if the request is gone.
    fn resume(
        &self,
        context_id: u32,
        result: impl FnOnce() -> Result<Option<RateLimitHeaders>, ()>,
    ) -> bool {
        if !host::set_effective_context(context_id) {
            return false;
        }
        if let Ok(headers) = result() {
            if let Some(h) = headers {
                self.resumed.borrow_mut().insert(context_id, h);
            }
            host::resume_http_request();
        }
        true
    }

    /// Counts request `context_id`: with the engine when `global` is on, else in this
    /// replica's counter.
    fn count_or_ask(self: &Rc<Self>, context_id: u32, item: &ToCount, now_ms: u64) -> Asked {
        match (&self.config.global, &item.engine) {
            (Some(g), Some((message, reset_ms))) => {
                self.ask_engine(g, context_id, item.countable, message, *reset_ms, now_ms)
            }
            _ => Asked::Done(self.count(&item.countable, now_ms)),
        }
    }

    /// SPEC §10: a bucket known to be over its limit gets the 429 without a call; otherwise
    /// the request asks the engine, or waits behind this VM's call for its bucket.
    fn ask_engine(
        self: &Rc<Self>,
        g: &GlobalConfig,
        context_id: u32,
        countable: Countable,
        message: &[u8],
        reset_ms: u64,
        now_ms: u64,
    ) -> Asked {
        if let Some(reset_ms) = self.known_over_limit(&countable, now_ms) {
            self.metrics.inc(Counter::GlobalCachedLimited);
            return Asked::Done(self.apply(&countable, self.over_limit(reset_ms), now_ms));
        }
        let waiting = Waiting {
            context_id,
            countable,
            message: message.to_vec(),
            reset_ms,
            deadline_ms: now_ms + g.timeout_ms,
        };
        let fingerprint = countable.fingerprint;
        let Some(waiting) = self.engine_queue.borrow_mut().arrive(fingerprint, waiting) else {
            return Asked::Paused;
        };
        match self.dispatch(g, fingerprint, waiting, now_ms) {
            Ok(()) => Asked::Paused,
            Err(_) => {
                // Nobody can be queued behind a call that never went out.
                let _ = self.engine_queue.borrow_mut().dispatch_failed(fingerprint);
                Asked::Done(self.fall_back(
                    g,
                    &countable,
                    now_ms,
                    "cannot call the rate-limit engine (is global.cluster defined in Envoy?)",
                ))
            }
        }
    }

    /// The reset of a bucket this replica knows to be over its limit in this window (an
    /// engine's OVER_LIMIT, or its own full count after a fallback): one shared-data read.
    fn known_over_limit(&self, countable: &Countable, now_ms: u64) -> Option<u64> {
        if !VERDICT_CACHE {
            return None;
        }
        let known = self
            .exhausted
            .borrow()
            .until(countable.fingerprint, countable.limit, now_ms);
        if known.is_some() {
            return known;
        }
        let shared = decision::exhausted_until(
            &self.config,
            &HostSharedData,
            &mut self.key_buf.borrow_mut(),
            &mut self.value_buf.borrow_mut(),
            countable,
            now_ms,
        );
        if let Some(reset_ms) = shared {
            self.remember_exhausted(countable, reset_ms, now_ms);
        }
        shared
    }

    /// Sends `waiting`'s question, with the time it has left.
    fn dispatch(
        self: &Rc<Self>,
        g: &GlobalConfig,
        fingerprint: u64,
        waiting: Waiting,
        now_ms: u64,
    ) -> Result<(), Waiting> {
        let timeout_ms = waiting.deadline_ms.saturating_sub(now_ms).max(1);
        match host::grpc_call(
            &g.cluster,
            rls::SERVICE,
            rls::METHOD,
            &waiting.message,
            timeout_ms,
        ) {
            Ok(token) => {
                self.metrics.inc(Counter::GlobalCalls);
                CALLS.with_borrow_mut(|c| {
                    c.insert(
                        token,
                        Call::Engine {
                            active: self.clone(),
                            fingerprint,
                            waiting,
                        },
                    )
                });
                Ok(())
            }
            Err(_) => Err(waiting),
        }
    }

    /// SPEC §10 `on_failure`: the request is counted by this replica's own counter, or let
    /// through uncounted.
    fn fall_back(
        &self,
        g: &GlobalConfig,
        countable: &Countable,
        now_ms: u64,
        why: &str,
    ) -> Result<Option<RateLimitHeaders>, ()> {
        self.metrics.inc(Counter::GlobalFailures);
        match g.on_failure {
            OnFailure::Local => {
                self.warn(now_ms, &format!("global: {why}; counted by this replica"));
                self.count(countable, now_ms)
            }
            OnFailure::Allow => {
                self.warn(
                    now_ms,
                    &format!("global: {why}; let through (on_failure allow)"),
                );
                Ok(None)
            }
        }
    }

    /// The engine answered the call of `fingerprint` made for `waiting` (or it failed):
    /// finish that request, then the ones queued behind it.
    fn engine_answered(
        self: &Rc<Self>,
        fingerprint: u64,
        waiting: Waiting,
        verdict: Verdict,
        now_ms: u64,
    ) {
        let Some(g) = &self.config.global else { return };
        let countable = waiting.countable;
        match verdict {
            Verdict::Admit { remaining } => {
                let pass = Decided::Pass {
                    remaining,
                    reset_ms: waiting.reset_ms,
                };
                self.resume(waiting.context_id, || self.apply(&countable, pass, now_ms));
            }
            Verdict::OverLimit => {
                if VERDICT_CACHE {
                    let events = decision::mark_exhausted(
                        &self.config,
                        &HostSharedData,
                        &mut self.key_buf.borrow_mut(),
                        &mut self.value_buf.borrow_mut(),
                        &countable,
                        now_ms,
                    );
                    self.metrics.record(&events);
                }
                self.remember_exhausted(&countable, waiting.reset_ms, now_ms);
                let over = self.over_limit(waiting.reset_ms);
                self.resume(waiting.context_id, || self.apply(&countable, over, now_ms));
            }
            Verdict::Failed => {
                self.resume(waiting.context_id, || {
                    self.fall_back(
                        g,
                        &countable,
                        now_ms,
                        "the rate-limit engine failed (gRPC error, timeout or unusable answer)",
                    )
                });
            }
        }
        // Without local verdicts (a benchmark build), the queued requests ask one by one.
        let dequeue = match verdict {
            Verdict::OverLimit if !VERDICT_CACHE => Verdict::Admit { remaining: 0 },
            v => v,
        };
        let next = self
            .engine_queue
            .borrow_mut()
            .ended(fingerprint, dequeue, now_ms);
        for w in next.reject {
            let over = self.over_limit(w.reset_ms);
            self.resume(w.context_id, || {
                self.metrics.inc(Counter::GlobalCachedLimited);
                self.apply(&w.countable, over, now_ms)
            });
        }
        let mut fall_back = next.fall_back;
        if let Some(w) = next.dispatch {
            // Another worker may have seen the bucket go over its limit meanwhile.
            if let Some(reset_ms) = self.known_over_limit(&w.countable, now_ms) {
                let rest =
                    self.engine_queue
                        .borrow_mut()
                        .ended(fingerprint, Verdict::OverLimit, now_ms);
                for w in std::iter::once(w).chain(rest.reject) {
                    let over = self.over_limit(reset_ms);
                    self.resume(w.context_id, || {
                        self.metrics.inc(Counter::GlobalCachedLimited);
                        self.apply(&w.countable, over, now_ms)
                    });
                }
            } else if let Err(w) = self.dispatch(g, fingerprint, w, now_ms) {
                fall_back.push(w);
                fall_back.extend(self.engine_queue.borrow_mut().dispatch_failed(fingerprint));
            }
        }
        for w in fall_back {
            self.resume(w.context_id, || {
                self.fall_back(
                    g,
                    &w.countable,
                    now_ms,
                    "the rate-limit engine did not answer in time",
                )
            });
        }
    }

    /// Finishes every request parked on the lookup of `user_fp`, with its answer.
    fn finish_lookup(self: &Rc<Self>, user_fp: u64, answer: Answer, now_ms: u64) {
        let Some(rt) = &self.bypass else { return };
        let finished = rt.parking.borrow_mut().finish(user_fp);
        for (context_id, item) in finished {
            if answer == Answer::Bypass {
                if self.resume(context_id, || Ok(None)) {
                    self.metrics.inc(Counter::Bypassed);
                }
                continue;
            }
            if answer == Answer::Failed {
                self.metrics.inc(Counter::CalloutFailures);
            }
            // Not a bypass: counted like any other request (with the engine when `global`
            // is on, which may pause it again).
            if !host::set_effective_context(context_id) {
                continue;
            }
            if let Asked::Done(result) = self.count_or_ask(context_id, &item, now_ms) {
                self.resume(context_id, || result);
            }
        }
    }

    /// Root tick: lookups run by other workers, lost lookups, and the bypass roles.
    fn tick(self: &Rc<Self>, now_ms: u64) {
        let Some(rt) = &self.bypass else { return };
        let mut buf = Vec::new();
        let ended = rt.parking.borrow().ended(now_ms, |user_fp| {
            let key = bypass::user_slot_key(bypass::user_slot(user_fp));
            let state = match HostSharedData.get(&key, &mut buf) {
                Ok(Some(_)) => bypass::read_slot(&buf, user_fp, now_ms),
                _ => CacheState::Miss,
            };
            match state {
                CacheState::Roles { roles, expires_ms } => {
                    let is_bypass = bypass::is_bypass(&roles, &rt.roles.borrow());
                    rt.local.borrow_mut().remember(user_fp, expires_ms, roles);
                    Seen::Answered(Answer::from_roles(is_bypass))
                }
                CacheState::Pending => Seen::Pending,
                CacheState::Miss => Seen::Gone,
            }
        });
        for (user_fp, answer) in ended {
            self.finish_lookup(user_fp, answer, now_ms);
        }
        // The bypass roles other VMs fetched.
        let key = bypass::shared_roles_key(&rt.config.permission);
        if let Ok(Some(_)) = HostSharedData.get(&key, &mut buf) {
            if let Some(roles) = SharedRoles::decode(&buf).roles {
                *rt.roles.borrow_mut() = roles;
            }
        }
    }

    /// Spends one `me` lookup of `client`'s budget of the minute (SPEC §11); `false` once it
    /// is used up. A store that fails lets the lookup happen (counted in `store_errors`).
    fn spend_lookup(&self, per_minute: u32, client: &[u8], now_ms: u64) -> bool {
        let Some(limit) = lookup::budget_limit(per_minute) else {
            return true;
        };
        let budget_fp = lookup::budget_fingerprint(self.seed, client);
        let mut key = String::with_capacity(24);
        let index = set_index(budget_fp, lookup::BUDGET_SETS);
        store::table_set_key(&mut key, lookup::BUDGET_TABLE, lookup::BUDGET_SETS, index);
        self.update(&key, |bytes| {
            lookup::spend_lookup(bytes, budget_fp, limit, now_ms)
        })
        .unwrap_or(true)
    }

    /// One shared-record update through the store's CAS loop, its retries and errors counted.
    fn update<W: AsRef<[u8]>, T>(
        &self,
        key: &str,
        step: impl FnMut(&[u8]) -> store::Step<W, T>,
    ) -> Result<T, StoreError> {
        let Updated { result, retries } =
            store::update(&HostSharedData, key, &mut Vec::new(), step);
        self.metrics.record(&Events {
            cas_retries: retries,
            store_error: result.is_err(),
            ..Events::default()
        });
        result
    }
}

/// A root context: one per plugin configuration of a VM.
pub struct Root {
    active: Option<Rc<Active>>,
    /// Defined at the first configuration and kept across later ones.
    metrics: Option<Rc<Metrics>>,
    /// The permissions refresh this VM has in flight.
    permissions_call: Option<u32>,
}

/// The process-wide hash seed: created once (by the first VM to configure, on Envoy's main
/// thread before any worker serves), then read by every VM.
fn shared_seed() -> Seed {
    let store = HostSharedData;
    let mut buf = Vec::new();
    if let Ok(Some(_)) = store.get(SEED_KEY, &mut buf) {
        if let Some(seed) = Seed::from_bytes(&buf) {
            return seed;
        }
    }
    let mut fresh = [0u8; 16];
    if getrandom::fill(&mut fresh).is_err() {
        // No entropy from the host: still distinct per process start.
        let t = host::now_ms();
        let (a, b) = fresh.split_at_mut(8);
        a.copy_from_slice(&t.to_le_bytes());
        b.copy_from_slice(&(t ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes());
    }
    let _ = store::create_if_missing(&store, SEED_KEY, &fresh, &mut buf);
    // Read back whatever is stored, so that every VM uses the one value.
    match store.get(SEED_KEY, &mut buf) {
        Ok(Some(_)) => Seed::from_bytes(&buf),
        _ => None,
    }
    .or_else(|| Seed::from_bytes(&fresh))
    .unwrap_or(Seed(0, 0))
}

/// Creates the user-cache slots and the shared roles entry if missing (never overwrites).
fn ensure_bypass_tables(b: &BypassConfig) -> Result<(), StoreError> {
    let store = HostSharedData;
    let mut buf = Vec::new();
    let roles_key = bypass::shared_roles_key(&b.permission);
    store::create_if_missing(
        &store,
        &roles_key,
        &SharedRoles::default().encode(),
        &mut buf,
    )?;
    store::ensure_table_in(&store, lookup::BUDGET_TABLE, lookup::BUDGET_SETS)?;
    let ready = bypass::user_table_ready_key();
    if store.get(&ready, &mut buf)?.is_some() {
        return Ok(());
    }
    for slot in 0..bypass::USER_CACHE_SLOTS {
        store::create_if_missing(&store, &bypass::user_slot_key(slot), store::EMPTY, &mut buf)?;
    }
    store.set(&ready, b"1", 0)
}

impl Root {
    pub fn new() -> Root {
        Root {
            active: None,
            metrics: None,
            permissions_call: None,
        }
    }

    pub fn configure(&mut self) -> bool {
        let bytes = host::plugin_configuration();
        let config = match config::parse(&bytes) {
            Ok(c) => c,
            Err(e) => {
                // The error names the field; the configuration text is never logged (it may
                // hold a token).
                log::error!("invalid configuration: {e}");
                return false;
            }
        };
        // Metrics first: they exist (at 0) from the first configuration on.
        let metrics = self
            .metrics
            .get_or_insert_with(|| Rc::new(Metrics::define()))
            .clone();
        let seed = shared_seed();
        if let Err(e) = store::ensure_table(&HostSharedData, config.counter_sets()) {
            log::error!("cannot create the counter table in shared data: {e:?}");
            return false;
        }
        let bypass = match &config.bypass {
            Some(b) => {
                if let Err(e) = ensure_bypass_tables(b) {
                    log::error!("cannot create the bypass cache in shared data: {e:?}");
                    return false;
                }
                host::set_tick_period_ms(TICK_MS);
                Some(BypassRuntime {
                    config: b.clone(),
                    roles: RefCell::new(b.roles.clone()),
                    parking: RefCell::default(),
                    local: RefCell::default(),
                })
            }
            None => {
                host::set_tick_period_ms(METRICS_FLUSH_MS);
                None
            }
        };
        log::info!(
            "configured (limiting {}, dry_run {}, {} client slots, bypass {}, global {})",
            config.limiting,
            config.dry_run,
            config.max_tracked_clients,
            if config.bypass.is_some() { "on" } else { "off" },
            match &config.global {
                Some(g) => format!("on: cluster {}, domain {}", g.cluster, g.domain),
                None => "off".to_string(),
            }
        );
        self.active = Some(Rc::new(Active {
            config,
            seed,
            metrics,
            bypass,
            key_buf: RefCell::default(),
            formatted: RefCell::default(),
            value_buf: RefCell::new(Vec::with_capacity(crate::limiter::SET_BYTES)),
            warnings: RefCell::default(),
            engine_queue: RefCell::default(),
            exhausted: RefCell::default(),
            resumed: RefCell::default(),
        }));
        true
    }

    pub fn tick(&mut self) {
        if let Some(metrics) = &self.metrics {
            metrics.flush();
        }
        let Some(active) = self.active.clone() else {
            return;
        };
        let Some(rt) = &active.bypass else { return };
        let now_ms = host::now_ms();
        active.tick(now_ms);
        // Permissions refresh: one VM at a time, through a lease in shared data.
        let Some((id, token)) = rt.config.service_account.as_ref() else {
            return;
        };
        if self
            .permissions_call
            .is_some_and(|t| CALLS.with_borrow(|c| c.contains_key(&t)))
        {
            return;
        }
        let key = bypass::shared_roles_key(&rt.config.permission);
        let lease_until_ms = now_ms + rt.config.timeout_ms + bypass::PENDING_GRACE_MS;
        let leased = active.update(&key, |bytes| {
            lookup::take_refresh_lease(bytes, now_ms, rt.config.refresh_interval_ms, lease_until_ms)
        });
        if leased != Ok(true) {
            return;
        }
        match rocketchat_get(&rt.config, &rt.config.permissions_path, id, token, None) {
            Ok(call) => {
                self.permissions_call = Some(call);
                CALLS.with_borrow_mut(|c| {
                    c.insert(
                        call,
                        Call::Permissions {
                            active: active.clone(),
                        },
                    )
                });
            }
            Err(_) => {
                active.metrics.inc(Counter::CalloutFailures);
                active.warn(
                    now_ms,
                    "bypass: cannot call the permissions endpoint (is bypass.cluster defined in Envoy?)",
                );
            }
        }
    }

    /// The plugin goes away (configuration replaced, listener drained, Envoy stopping): hand
    /// over the counts still pending.
    pub fn done(&mut self) {
        if let Some(metrics) = &self.metrics {
            metrics.flush();
        }
    }

    pub fn create_http_context(&self, context_id: u32) -> Http {
        Http {
            context_id,
            active: self.active.clone(),
            headers: None,
        }
    }
}

/// An HTTP context: one request.
pub struct Http {
    context_id: u32,
    active: Option<Rc<Active>>,
    headers: Option<RateLimitHeaders>,
}

/// SPEC §11: does this request, on a path that carries credentials, have to be refused because
/// it did not reach Envoy over TLS? `forwarded_proto`: `x-forwarded-proto` if the header map was
/// already read (`Some(None)`: absent), else read here; the TLS property only if needed.
fn https_required(
    config: &Config,
    method: &[u8],
    path: &[u8],
    forwarded_proto: Option<Option<&[u8]>>,
) -> bool {
    let Some(paths) = &config.https_only_login else {
        return false;
    };
    if !paths.covers(method, path) {
        return false;
    }
    let read;
    let proto = match forwarded_proto {
        Some(known) => known,
        None => {
            read = host::header(host::MAP_REQUEST_HEADERS, "x-forwarded-proto");
            read.as_deref()
        }
    };
    !edge::over_tls(proto, || host::property(TLS_VERSION))
}

/// A header value that may be sent on in a callout: present, non-empty, UTF-8.
fn credential(value: Option<&[u8]>) -> Option<&str> {
    value
        .filter(|v| !v.is_empty())
        .and_then(|v| std::str::from_utf8(v).ok())
}

impl Http {
    pub fn request_headers(&mut self) -> Action {
        #[cfg(feature = "test-trap")]
        if host::header(
            host::MAP_REQUEST_HEADERS,
            "x-rocketchat-ratelimit-test-trap",
        )
        .is_some()
        {
            // Test builds only (see Cargo.toml): a real trap, as a bug would cause.
            core::arch::wasm32::unreachable();
        }
        let Some(active) = self.active.clone() else {
            return Action::Continue;
        };
        // With bypass on, four request headers are needed: one host call for the whole map
        // beats four. Without it, the path comes first and the method is read only for a
        // path that can be limited (or carries credentials): outside api_prefix (most of a
        // Rocket.Chat's traffic) a request costs one header read.
        let (map, path_header, method_header);
        let (mut method, path, credentials, forwarded_proto) = if active.bypass.is_some() {
            map = host::header_pairs(host::MAP_REQUEST_HEADERS);
            let [method, path, user_id, token, proto] = headers::find(
                &map,
                [
                    ":method",
                    ":path",
                    "x-user-id",
                    "x-auth-token",
                    "x-forwarded-proto",
                ],
            );
            let credentials = credential(user_id).zip(credential(token));
            (method.unwrap_or_default(), path, credentials, Some(proto))
        } else {
            path_header = host::header(host::MAP_REQUEST_HEADERS, ":path");
            (&[][..], path_header.as_deref(), None, None)
        };
        let Some(interest) = path.and_then(|p| decision::interest(&active.config, p)) else {
            active.metrics.inc(Counter::NotLimited);
            return Action::Continue;
        };
        if active.bypass.is_none() {
            method_header = host::header(host::MAP_REQUEST_HEADERS, ":method");
            method = method_header.as_deref().unwrap_or_default();
        }
        if interest.credentials
            && https_required(&active.config, method, &interest.path, forwarded_proto)
        {
            active.metrics.inc(Counter::HttpsRequired);
            let reply = response::https_required();
            let sent = host::send_local_response(
                reply.status,
                "rocketchat_ratelimit_https_required",
                &reply.headers,
                reply.body.as_bytes(),
            );
            if !sent {
                active.warn(host::now_ms(), "Envoy refused the https-required reply");
            }
            return Action::Pause;
        }
        if !interest.limitable {
            active.metrics.inc(Counter::NotLimited);
            return Action::Continue;
        }
        let path = interest.path;
        let classified =
            decision::classify_limitable(&active.config, active.seed, method, &path, || {
                host::property(SOURCE_ADDRESS)
            });
        let Some(classified) = classified else {
            active.metrics.inc(Counter::NotLimited);
            return Action::Continue;
        };
        let now_ms = host::now_ms();
        let item = ToCount {
            countable: classified.countable,
            engine: active.config.global.as_ref().map(|g| {
                let message = global::engine_request(
                    &g.domain,
                    &classified.client(),
                    method,
                    classified.bucket,
                    &classified.countable,
                    now_ms,
                );
                let reset_ms = window_end(now_ms, classified.countable.limit.interval_ms);
                (message, reset_ms)
            }),
        };
        if let Some(action) = self.bypass_step(&active, &item, credentials, &classified, now_ms) {
            return action;
        }
        let result = match active.count_or_ask(self.context_id, &item, now_ms) {
            Asked::Paused => return Action::Pause,
            Asked::Done(result) => result,
        };
        match result {
            Ok(headers) => {
                self.headers = headers;
                Action::Continue
            }
            Err(()) => Action::Pause,
        }
    }

    /// The bypass step (SPEC §5) for a request that would be counted. `None`: no bypass
    /// question (count now); `Some(action)`: decided or parked.
    fn bypass_step(
        &mut self,
        active: &Rc<Active>,
        item: &ToCount,
        credentials: Option<(&str, &str)>,
        classified: &decision::Classified,
        now_ms: u64,
    ) -> Option<Action> {
        let rt = active.bypass.as_ref()?;
        // Only a request carrying both credentials can bypass (§5.1); others: no callout.
        let (user_id, token) = credentials?;
        let user_fp = bypass::user_fingerprint(active.seed, user_id.as_bytes(), token.as_bytes());
        let bypassed = |is_bypass: bool| {
            is_bypass.then(|| {
                active.metrics.inc(Counter::Bypassed);
                Action::Continue
            })
        };
        let known = rt
            .local
            .borrow()
            .is_bypass(user_fp, now_ms, &rt.roles.borrow());
        if let Some(is_bypass) = known {
            return bypassed(is_bypass);
        }
        let key = bypass::user_slot_key(bypass::user_slot(user_fp));
        let deadline_ms = now_ms + rt.config.timeout_ms + bypass::PENDING_GRACE_MS;
        let looking_up_here = rt.parking.borrow().is_looking_up(user_fp);
        // One read first: a cached answer, or a lookup under way, costs none of the client's
        // lookups (SPEC §11); a miss spends one, or is counted without a callout.
        let seen = active
            .update(&key, |bytes| {
                store::Step::<&[u8], _>::Keep(lookup::peek(bytes, user_fp, now_ms, looking_up_here))
            })
            .ok()?; // no cache: count as usual
        let claim = match seen {
            Claim::Ask => {
                let per_minute = rt.config.lookups_per_client_per_minute;
                if !active.spend_lookup(per_minute, &classified.client(), now_ms) {
                    active.metrics.inc(Counter::LookupsRefused);
                    return None;
                }
                active
                    .update(&key, |bytes| {
                        lookup::claim(bytes, user_fp, now_ms, deadline_ms, looking_up_here)
                    })
                    .ok()?
            }
            seen => seen,
        };
        match claim {
            Claim::Known { roles, expires_ms } => {
                let is_bypass = bypass::is_bypass(&roles, &rt.roles.borrow());
                rt.local.borrow_mut().remember(user_fp, expires_ms, roles);
                bypassed(is_bypass)
            }
            Claim::Wait => {
                // Someone (here or on another worker) is asking: wait for that answer.
                let mut parking = rt.parking.borrow_mut();
                parking.park(self.context_id, user_fp, item.clone(), deadline_ms, false);
                Some(Action::Pause)
            }
            Claim::Ask => {
                let ip = String::from_utf8_lossy(client_ip(&classified.source_address));
                match rocketchat_get(&rt.config, &rt.config.me_path, user_id, token, Some(&ip)) {
                    Ok(call) => {
                        CALLS.with_borrow_mut(|c| {
                            c.insert(
                                call,
                                Call::Me {
                                    active: active.clone(),
                                    user_fp,
                                    user_id: user_id.as_bytes().to_vec(),
                                },
                            )
                        });
                        let mut parking = rt.parking.borrow_mut();
                        parking.park(self.context_id, user_fp, item.clone(), deadline_ms, true);
                        Some(Action::Pause)
                    }
                    Err(_) => {
                        let _ = active.update(&key, |bytes| lookup::clear_pending(bytes, user_fp));
                        active.metrics.inc(Counter::CalloutFailures);
                        active.warn(
                            now_ms,
                            "bypass: cannot call the me endpoint (is bypass.cluster defined in Envoy?)",
                        );
                        None
                    }
                }
            }
        }
    }

    pub fn response_headers(&mut self) {
        let headers = self.headers.take().or_else(|| {
            let active = self.active.as_ref()?;
            let h = active.resumed.borrow_mut().remove(&self.context_id);
            h
        });
        let (Some(h), Some(active)) = (headers, self.active.as_ref()) else {
            return;
        };
        h.each_cached(&mut active.formatted.borrow_mut(), |name, value| {
            host::set_header(host::MAP_RESPONSE_HEADERS, name, value)
        });
    }
}

impl Drop for Http {
    /// A request that ends while parked (client gone) leaves nothing behind.
    fn drop(&mut self) {
        let Some(active) = self.active.as_ref() else {
            return;
        };
        active.resumed.borrow_mut().remove(&self.context_id);
        active.engine_queue.borrow_mut().forget(self.context_id);
        if let Some(rt) = &active.bypass {
            rt.parking.borrow_mut().forget(self.context_id);
        }
    }
}

/// `GET path` on the bypass cluster with these credentials, and for a caller's own lookup its
/// client IP (so a Rocket.Chat whose limiter is on counts the lookup against that client).
/// The callout's token, or the host's status if Envoy refused it (e.g. no such cluster).
fn rocketchat_get(
    bypass: &BypassConfig,
    path: &str,
    user_id: &str,
    token: &str,
    client_ip: Option<&str>,
) -> Result<u32, u32> {
    let mut headers = vec![
        (":method", "GET"),
        (":path", path),
        (":authority", bypass.authority.as_str()),
        ("accept", "application/json"),
        ("x-user-id", user_id),
        ("x-auth-token", token),
    ];
    if let Some(ip) = client_ip {
        headers.push(("x-real-ip", ip));
        headers.push(("x-forwarded-for", ip));
    }
    host::http_call(&bypass.cluster, &headers, bypass.timeout_ms)
}

/// An HTTP callout answered (or failed: no `:status`). Routed by token, whichever context
/// dispatched it and whether or not its request is still there.
pub fn on_http_call_response(token: u32, body_size: usize) {
    let Some(call) = CALLS.with_borrow_mut(|c| c.remove(&token)) else {
        return;
    };
    let now_ms = host::now_ms();
    let status = host::http_call_status();
    let body = host::buffer(
        host::BUFFER_HTTP_CALL_RESPONSE_BODY,
        body_size.min(MAX_ANSWER_BYTES),
    );
    match call {
        Call::Me {
            active,
            user_fp,
            user_id,
        } => me_answered(&active, user_fp, &user_id, status, &body, now_ms),
        Call::Permissions { active } => permissions_answered(&active, status, &body, now_ms),
        Call::Engine { .. } => {}
    }
}

/// A Rate Limit Service call answered (`Ok(message size)`) or failed (`Err(gRPC status)`).
pub fn on_grpc_answer(token: u32, result: Result<usize, u32>) {
    let Some(call) = CALLS.with_borrow_mut(|c| c.remove(&token)) else {
        return;
    };
    let Call::Engine {
        active,
        fingerprint,
        waiting,
    } = call
    else {
        return;
    };
    let now_ms = host::now_ms();
    let verdict = match result {
        Ok(size) => {
            let message =
                host::buffer(host::BUFFER_GRPC_RECEIVE, size.min(MAX_ENGINE_ANSWER_BYTES));
            global::verdict(&message, waiting.countable.limit.requests.get())
        }
        Err(_) => Verdict::Failed,
    };
    active.engine_answered(fingerprint, waiting, verdict, now_ms);
}

fn me_answered(
    active: &Rc<Active>,
    user_fp: u64,
    user_id: &[u8],
    status: Option<u16>,
    body: &[u8],
    now_ms: u64,
) {
    let Some(rt) = &active.bypass else { return };
    let key = bypass::user_slot_key(bypass::user_slot(user_fp));
    let roles = match bypass::parse_me(status, body, user_id) {
        MeAnswer::Roles(roles) => roles,
        MeAnswer::NotAuthenticated => Vec::new(),
        MeAnswer::Failure => {
            let _ = active.update(&key, |bytes| lookup::clear_pending(bytes, user_fp));
            active.warn(
                now_ms,
                "bypass: me lookup failed (timeout, reset, non-200 or bad JSON); counted as a normal request",
            );
            active.finish_lookup(user_fp, Answer::Failed, now_ms);
            return;
        }
    };
    let answer = Answer::from_roles(bypass::is_bypass(&roles, &rt.roles.borrow()));
    let expires_ms = now_ms + rt.config.cache_ttl_ms;
    let value = bypass::resolved_slot(user_fp, expires_ms, &roles);
    rt.local.borrow_mut().remember(user_fp, expires_ms, roles);
    let _ = active.update(&key, |bytes| {
        lookup::store_answer(bytes, user_fp, now_ms, &value)
    });
    active.finish_lookup(user_fp, answer, now_ms);
}

fn permissions_answered(active: &Active, status: Option<u16>, body: &[u8], now_ms: u64) {
    let Some(rt) = &active.bypass else { return };
    let roles = bypass::parse_permissions(status, body, &rt.config.permission);
    if roles.is_none() {
        active.metrics.inc(Counter::CalloutFailures);
        active.warn(
            now_ms,
            "bypass: permissions lookup failed; keeping the previous bypass roles",
        );
    }
    let key = bypass::shared_roles_key(&rt.config.permission);
    let retry_at_ms = now_ms + PERMISSIONS_RETRY_MS;
    let _ = active.update(&key, |bytes| {
        lookup::record_refresh(bytes, now_ms, roles.as_deref(), retry_at_ms)
    });
    if let Some(r) = roles {
        *rt.roles.borrow_mut() = r;
    }
}
