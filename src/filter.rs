//! The proxy-wasm adapter: fetches what the decision needs from Envoy, and applies the result.
//! The request phase decides (and counts); the response phase only adds headers.
//!
//! Bypass (SPEC §5) may need an answer from Rocket.Chat first: the request is then *parked*
//! (paused) until the answer arrives, on this worker or on another one, and is finished by
//! whichever code sees the answer first (the callout response, or the root context's tick).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::bypass::{self, CacheState, MeAnswer, SharedRoles};
use crate::client::client_ip;
use crate::config::{self, BypassConfig, Config};
use crate::decision::{self, Countable, Events};
use crate::fingerprint::Seed;
use crate::headers;
use crate::host::{self, HostSharedData};
use crate::metrics::{Counter, COUNTER_NAMES, GAUGE_TRACKED_CLIENTS};
use crate::response::{too_many_requests_body, wait_seconds, Decimal};
use crate::store::{self, SharedStore};

const SEED_KEY: &str = "rlrc1:seed";
const SOURCE_ADDRESS: &[u8] = b"source\0address";
/// How often a VM with bypass on looks at lookups other workers run, and at the bypass roles
/// (and flushes its metrics).
const TICK_MS: u32 = 20;
/// How often a VM without bypass hands its batched metric counts to Envoy.
const METRICS_FLUSH_MS: u32 = 100;
/// Wait before retrying a failed permissions refresh.
const PERMISSIONS_RETRY_MS: u64 = 5_000;

proxy_wasm::main! {{
    let _ = log::set_logger(&host::HostLogger);
    log::set_max_level(log::LevelFilter::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { active: None, metrics: None, permissions_call: None })
    });
}}

/// Metric ids of this VM (every VM defines the same names; Envoy maps them to one stat), and
/// the counts not yet handed to Envoy.
///
/// Counts are batched: a request adds to a per-VM count, and the root context's tick hands the
/// sums to Envoy (one `increment_metric` per counter that moved), so a request makes no metric
/// host call at all (issue #5: each host call costs ~1 µs here). The stats lag by at most
/// one tick ([`METRICS_FLUSH_MS`], or the bypass tick); what is pending when the plugin goes
/// away is flushed in `on_done`. A VM that traps loses at most one tick of counts. One per
/// root context (see `Root::metrics`).
struct Metrics {
    counters: [Option<u32>; COUNTER_NAMES.len()],
    tracked_clients: Option<u32>,
    pending: [Cell<u64>; COUNTER_NAMES.len()],
    pending_tracked_clients: Cell<u64>,
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
            pending: Default::default(),
            pending_tracked_clients: Cell::new(0),
        }
    }

    fn add(&self, counter: Counter, n: u64) {
        if let Some(pending) = self.pending.get(counter as usize) {
            pending.set(pending.get().saturating_add(n));
        }
    }

    fn inc(&self, counter: Counter) {
        self.add(counter, 1);
    }

    fn record(&self, events: &Events) {
        self.add(Counter::CasRetries, u64::from(events.cas_retries));
        if events.collision {
            self.inc(Counter::TableCollisions);
        }
        if events.store_error {
            self.inc(Counter::StoreErrors);
        }
        if events.new_slot {
            let pending = &self.pending_tracked_clients;
            pending.set(pending.get().saturating_add(1));
        }
    }

    /// Hands the pending counts to Envoy.
    fn flush(&self) {
        let as_delta = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (pending, id) in self.pending.iter().zip(self.counters) {
            let n = pending.replace(0);
            if let (true, Some(id)) = (n > 0, id) {
                host::increment_metric(id, as_delta(n));
            }
        }
        let n = self.pending_tracked_clients.replace(0);
        if let (true, Some(id)) = (n > 0, self.tracked_clients) {
            host::increment_metric(id, as_delta(n));
        }
    }
}

/// The `x-ratelimit-*` values to add in the response phase.
#[derive(Clone, Copy)]
struct RateLimitHeaders {
    limit: u32,
    remaining: u32,
    reset_ms: u64,
}

/// One user lookup this VM waits for.
struct Lookup {
    /// Parked requests (context ids) waiting for the answer.
    waiters: Vec<u32>,
    /// After this, the lookup counts as failed.
    deadline_ms: u64,
    /// This VM sent the callout (its answer arrives here); otherwise another worker did and
    /// the answer is read from shared data on tick.
    dispatched_here: bool,
}

/// The bypass state of one VM.
struct BypassRuntime {
    config: BypassConfig,
    /// The roles holding the permission, as last seen in shared data (or the configured ones).
    roles: RefCell<Vec<String>>,
    lookups: RefCell<BTreeMap<u64, Lookup>>,
    /// Parked requests (context id → what to count once the answer is in).
    parked: RefCell<BTreeMap<u32, Countable>>,
    /// Headers for parked requests that were let through, read in their response phase.
    parked_headers: RefCell<BTreeMap<u32, RateLimitHeaders>>,
    /// This VM's copy of answers it has seen (user fingerprint → expiry, roles), so a repeat
    /// caller costs no shared-data read. Same expiry as the shared entry; roles (not the
    /// verdict) are kept so a change of the bypass roles applies at once.
    local: RefCell<BTreeMap<u64, (u64, Vec<String>)>>,
}

/// Entries of the per-VM answer copy; when full it starts over (the shared cache still holds
/// every answer).
const LOCAL_ANSWERS: usize = 4096;

impl BypassRuntime {
    fn local_roles(&self, user_fp: u64, now_ms: u64) -> Option<bool> {
        let local = self.local.borrow();
        let (expires_ms, roles) = local.get(&user_fp)?;
        (*expires_ms > now_ms).then(|| bypass::is_bypass(roles, &self.roles.borrow()))
    }

    fn remember(&self, user_fp: u64, expires_ms: u64, roles: Vec<String>) {
        let mut local = self.local.borrow_mut();
        if local.len() >= LOCAL_ANSWERS {
            local.clear();
        }
        local.insert(user_fp, (expires_ms, roles));
    }
}

/// Everything a configured plugin shares with its HTTP contexts (one per VM, single-threaded).
struct Active {
    config: Config,
    seed: Seed,
    metrics: Rc<Metrics>,
    bypass: Option<BypassRuntime>,
    /// Reused for every request: the counter key and the value read from shared data.
    key_buf: RefCell<String>,
    value_buf: RefCell<Vec<u8>>,
    /// Rate limit for warning logs under failure (at most one a second per VM).
    last_warning_ms: Cell<u64>,
    suppressed_warnings: Cell<u64>,
}

enum Outcome {
    /// Let through; add these headers (none for bypass or fail-open).
    Continue(Option<RateLimitHeaders>),
    /// The 429 was sent.
    Rejected,
}

impl Active {
    fn warn_rate_limited(&self, now_ms: u64, message: &str) {
        if now_ms.saturating_sub(self.last_warning_ms.get()) >= 1000 {
            let suppressed = self.suppressed_warnings.replace(0);
            log::warn!("{message} ({suppressed} similar messages suppressed)");
            self.last_warning_ms.set(now_ms);
        } else {
            self.suppressed_warnings
                .set(self.suppressed_warnings.get().saturating_add(1));
        }
    }

    /// Counts a request and applies the verdict to the *effective* context.
    fn count_and_apply(&self, countable: &Countable, now_ms: u64) -> Outcome {
        let (action, events) = decision::count_request(
            &self.config,
            &HostSharedData,
            &mut self.key_buf.borrow_mut(),
            &mut self.value_buf.borrow_mut(),
            countable,
            now_ms,
        );
        self.metrics.record(&events);
        let limit = countable.limit.requests.get();
        match action {
            decision::Action::Pass {
                remaining,
                reset_ms,
            } => {
                self.metrics.inc(Counter::Allowed);
                Outcome::Continue(Some(RateLimitHeaders {
                    limit,
                    remaining,
                    reset_ms,
                }))
            }
            decision::Action::DryRunLimited { reset_ms } => {
                self.metrics.inc(Counter::DryRunLimited);
                self.warn_rate_limited(now_ms, "dry run: a request over its limit was let through");
                Outcome::Continue(Some(RateLimitHeaders {
                    limit,
                    remaining: 0,
                    reset_ms,
                }))
            }
            decision::Action::Reject { reset_ms } => {
                self.metrics.inc(Counter::Limited);
                self.reject(limit, reset_ms, now_ms);
                Outcome::Rejected
            }
            decision::Action::FailOpen => {
                self.warn_rate_limited(
                    now_ms,
                    "counter store failed or stayed contended; request let through",
                );
                Outcome::Continue(None)
            }
        }
    }

    fn reject(&self, limit: u32, reset_ms: u64, now_ms: u64) {
        let wait = wait_seconds(reset_ms, now_ms);
        let body = too_many_requests_body(wait);
        let limit = Decimal::new(u64::from(limit));
        let reset = Decimal::new(reset_ms);
        let wait_text = Decimal::new(wait);
        let mut headers: Vec<(&str, &str)> = vec![
            ("content-type", "application/json"),
            ("x-ratelimit-limit", limit.as_str()),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", reset.as_str()),
        ];
        if self.config.retry_after {
            headers.push(("retry-after", wait_text.as_str()));
        }
        if !host::send_local_response(429, "rocketchat_ratelimit", &headers, body.as_bytes()) {
            self.warn_rate_limited(now_ms, "Envoy refused the 429 reply");
        }
    }

    /// Finishes every request parked on the lookup of `user_fp`, with its answer.
    fn finish_lookup(&self, user_fp: u64, answer: Option<bool>, now_ms: u64) {
        let Some(rt) = &self.bypass else { return };
        let Some(lookup) = rt.lookups.borrow_mut().remove(&user_fp) else {
            return;
        };
        for context_id in lookup.waiters {
            self.finish_parked(context_id, answer, now_ms);
        }
    }

    /// `answer`: `Some(true)` bypass, `Some(false)` not a bypass user, `None` lookup failed.
    fn finish_parked(&self, context_id: u32, answer: Option<bool>, now_ms: u64) {
        let Some(rt) = &self.bypass else { return };
        let Some(parked) = rt.parked.borrow_mut().remove(&context_id) else {
            return; // the request is gone (client closed)
        };
        if !host::set_effective_context(context_id) {
            return;
        }
        if answer == Some(true) {
            self.metrics.inc(Counter::Bypassed);
            host::resume_http_request();
            return;
        }
        if answer.is_none() {
            self.metrics.inc(Counter::CalloutFailures);
        }
        match self.count_and_apply(&parked, now_ms) {
            Outcome::Continue(headers) => {
                if let Some(h) = headers {
                    rt.parked_headers.borrow_mut().insert(context_id, h);
                }
                host::resume_http_request();
            }
            Outcome::Rejected => {}
        }
    }

    /// Root tick: lookups run by other workers, lost lookups, and the bypass roles.
    fn tick(&self, now_ms: u64) -> Option<()> {
        let rt = self.bypass.as_ref()?;
        let mut finished: Vec<(u64, Option<bool>)> = Vec::new();
        let mut buf = Vec::new();
        for (user_fp, lookup) in rt.lookups.borrow().iter() {
            if lookup.dispatched_here {
                if now_ms >= lookup.deadline_ms {
                    finished.push((*user_fp, None));
                }
                continue;
            }
            let key = bypass::user_slot_key(bypass::user_slot(*user_fp));
            let state = match HostSharedData.get(&key, &mut buf) {
                Ok(Some(_)) => bypass::read_slot(&buf, *user_fp, now_ms),
                _ => CacheState::Miss,
            };
            match state {
                CacheState::Roles { roles, expires_ms } => {
                    finished.push((
                        *user_fp,
                        Some(bypass::is_bypass(&roles, &rt.roles.borrow())),
                    ));
                    rt.remember(*user_fp, expires_ms, roles);
                }
                CacheState::Pending if now_ms < lookup.deadline_ms => {}
                // The other worker's lookup failed (it cleared the slot) or was lost.
                _ => finished.push((*user_fp, None)),
            }
        }
        for (user_fp, answer) in finished {
            self.finish_lookup(user_fp, answer, now_ms);
        }
        // The bypass roles other VMs fetched.
        let shared = self.shared_roles(&mut buf);
        if let Some(roles) = shared.and_then(|(s, _)| s.roles) {
            *rt.roles.borrow_mut() = roles;
        }
        Some(())
    }

    fn shared_roles(&self, buf: &mut Vec<u8>) -> Option<(SharedRoles, u32)> {
        let rt = self.bypass.as_ref()?;
        let key = bypass::shared_roles_key(&rt.config.permission);
        match HostSharedData.get(&key, buf) {
            Ok(Some(cas)) => Some((SharedRoles::decode(buf), cas)),
            _ => None,
        }
    }
}

struct Root {
    active: Option<Rc<Active>>,
    /// Defined at the first configuration and kept across later ones: requests still running
    /// on a replaced configuration add to the same pending counts, which this root flushes.
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
    let _ = store.set(SEED_KEY, &fresh, 0);
    // Read back whatever is stored, so that every VM uses the one value.
    match store.get(SEED_KEY, &mut buf) {
        Ok(Some(_)) => Seed::from_bytes(&buf),
        _ => None,
    }
    .or_else(|| Seed::from_bytes(&fresh))
    .unwrap_or(Seed(0, 0))
}

/// Creates the user-cache slots and the shared roles entry if missing (never overwrites).
fn ensure_bypass_tables(b: &BypassConfig) -> Result<(), store::StoreError> {
    let store = HostSharedData;
    let mut buf = Vec::new();
    let roles_key = bypass::shared_roles_key(&b.permission);
    if store.get(&roles_key, &mut buf)?.is_none() {
        store.set(&roles_key, &SharedRoles::default().encode(), 0)?;
    }
    let ready = bypass::user_table_ready_key();
    if store.get(&ready, &mut buf)?.is_some() {
        return Ok(());
    }
    for slot in 0..bypass::USER_CACHE_SLOTS {
        let key = bypass::user_slot_key(slot);
        if store.get(&key, &mut buf)?.is_none() {
            store.set(&key, bypass::EMPTY_SLOT, 0)?;
        }
    }
    store.set(&ready, b"1", 0)
}

impl Context for Root {
    /// The plugin goes away (configuration replaced, listener drained, Envoy stopping): hand
    /// over the counts still pending.
    fn on_done(&mut self) -> bool {
        if let Some(metrics) = &self.metrics {
            metrics.flush();
        }
        true
    }

    fn on_http_call_response(
        &mut self,
        token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        if self.permissions_call != Some(token_id) {
            return;
        }
        self.permissions_call = None;
        let Some(active) = self.active.clone() else {
            return;
        };
        let Some(rt) = &active.bypass else { return };
        let now_ms = host::now_ms();
        let status = host::http_call_status();
        let body = host::buffer(host::BUFFER_HTTP_CALL_RESPONSE_BODY, body_size.min(4 << 20));
        let roles = bypass::parse_permissions(status, &body, &rt.config.permission);
        if roles.is_none() {
            active.metrics.inc(Counter::CalloutFailures);
            active.warn_rate_limited(
                now_ms,
                "bypass: permissions lookup failed; keeping the previous bypass roles",
            );
        }
        let mut buf = Vec::new();
        for _ in 0..store::MAX_CAS_ATTEMPTS {
            let Some((mut shared, cas)) = active.shared_roles(&mut buf) else {
                break;
            };
            match &roles {
                Some(r) => {
                    shared.roles = Some(r.clone());
                    shared.fetched_ms = now_ms;
                    shared.lease_until_ms = 0;
                }
                None => shared.lease_until_ms = now_ms + PERMISSIONS_RETRY_MS,
            }
            let key = bypass::shared_roles_key(&rt.config.permission);
            match HostSharedData.set(&key, &shared.encode(), cas) {
                Err(store::StoreError::CasMismatch) => continue,
                _ => break,
            }
        }
        if let Some(r) = roles {
            *rt.roles.borrow_mut() = r;
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
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
                    local: RefCell::new(BTreeMap::new()),
                    lookups: RefCell::new(BTreeMap::new()),
                    parked: RefCell::new(BTreeMap::new()),
                    parked_headers: RefCell::new(BTreeMap::new()),
                })
            }
            None => {
                host::set_tick_period_ms(METRICS_FLUSH_MS);
                None
            }
        };
        log::info!(
            "configured (limiting {}, dry_run {}, {} client slots, bypass {})",
            config.limiting,
            config.dry_run,
            config.max_tracked_clients,
            if config.bypass.is_some() { "on" } else { "off" }
        );
        self.active = Some(Rc::new(Active {
            config,
            seed,
            metrics,
            bypass,
            key_buf: RefCell::new(String::with_capacity(32)),
            value_buf: RefCell::new(Vec::with_capacity(crate::limiter::SET_BYTES)),
            last_warning_ms: Cell::new(0),
            suppressed_warnings: Cell::new(0),
        }));
        true
    }

    fn on_tick(&mut self) {
        if let Some(metrics) = &self.metrics {
            metrics.flush();
        }
        let Some(active) = self.active.clone() else {
            return;
        };
        if active.bypass.is_none() {
            return;
        }
        let now_ms = host::now_ms();
        active.tick(now_ms);
        // Permissions refresh: one VM at a time, through a lease in shared data.
        let Some(rt) = &active.bypass else { return };
        let Some((id, token)) = rt.config.service_account.as_ref() else {
            return;
        };
        if self.permissions_call.is_some() {
            return;
        }
        let mut buf = Vec::new();
        let Some((mut shared, cas)) = active.shared_roles(&mut buf) else {
            return;
        };
        if !shared.refresh_due(now_ms, rt.config.refresh_interval_ms) {
            return;
        }
        shared.lease_until_ms = now_ms + rt.config.timeout_ms + bypass::PENDING_GRACE_MS;
        let key = bypass::shared_roles_key(&rt.config.permission);
        if HostSharedData.set(&key, &shared.encode(), cas).is_err() {
            return; // another VM took the lease
        }
        match rocketchat_get(
            self,
            &rt.config,
            &rt.config.permissions_path,
            id,
            token,
            None,
        ) {
            Some(call) => self.permissions_call = Some(call),
            None => {
                active.metrics.inc(Counter::CalloutFailures);
                active.warn_rate_limited(
                    now_ms,
                    "bypass: cannot call the permissions endpoint (is bypass.cluster defined in Envoy?)",
                );
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            context_id,
            active: self.active.clone(),
            headers: None,
            lookup: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Http {
    context_id: u32,
    active: Option<Rc<Active>>,
    headers: Option<RateLimitHeaders>,
    /// The user lookup this context dispatched (its answer arrives here).
    lookup: Option<(u64, Vec<u8>)>,
}

/// A header value that may be sent on in a callout: present, non-empty, UTF-8.
fn credential(value: Option<&[u8]>) -> Option<&str> {
    value
        .filter(|v| !v.is_empty())
        .and_then(|v| std::str::from_utf8(v).ok())
}

impl Http {
    /// `path` as [`decision::limitable_path`] returned it.
    fn classify(active: &Active, method: &[u8], path: &[u8]) -> Option<Countable> {
        decision::classify_limitable(&active.config, active.seed, method, path, || {
            host::property(SOURCE_ADDRESS)
        })
    }

    fn apply(&mut self, outcome: Outcome) -> Action {
        match outcome {
            Outcome::Continue(headers) => {
                self.headers = headers;
                Action::Continue
            }
            Outcome::Rejected => Action::Pause,
        }
    }

    /// The bypass step (SPEC §5) for a request that would be counted. `None`: no bypass
    /// question (count now); `Some(action)`: decided or parked.
    fn bypass_step(
        &mut self,
        active: &Active,
        countable: &Countable,
        credentials: Option<(&str, &str)>,
        now_ms: u64,
    ) -> Option<Action> {
        let rt = active.bypass.as_ref()?;
        // Only a request carrying both credentials can bypass (§5.1); others: no callout.
        let (user_id, token) = credentials?;
        let user_fp = bypass::user_fingerprint(active.seed, user_id.as_bytes(), token.as_bytes());
        let verdict = |is_bypass: bool| {
            if is_bypass {
                active.metrics.inc(Counter::Bypassed);
                Some(Action::Continue)
            } else {
                None
            }
        };
        if let Some(is_bypass) = rt.local_roles(user_fp, now_ms) {
            return verdict(is_bypass);
        }
        let key = bypass::user_slot_key(bypass::user_slot(user_fp));
        let parked = *countable;
        let deadline_ms = now_ms + rt.config.timeout_ms + bypass::PENDING_GRACE_MS;
        let mut buf = Vec::new();
        for _ in 0..4 {
            let cas = match HostSharedData.get(&key, &mut buf) {
                Ok(Some(cas)) => cas,
                _ => return None, // no cache: count as usual
            };
            match bypass::read_slot(&buf, user_fp, now_ms) {
                CacheState::Roles { roles, expires_ms } => {
                    let is_bypass = bypass::is_bypass(&roles, &rt.roles.borrow());
                    rt.remember(user_fp, expires_ms, roles);
                    return verdict(is_bypass);
                }
                CacheState::Pending => {
                    // Someone (here or on another worker) is asking: wait for that answer.
                    self.park(rt, user_fp, parked, deadline_ms, false);
                    return Some(Action::Pause);
                }
                CacheState::Miss => {
                    if rt.lookups.borrow().contains_key(&user_fp) {
                        self.park(rt, user_fp, parked, deadline_ms, false);
                        return Some(Action::Pause);
                    }
                    let marker = bypass::pending_slot(user_fp, deadline_ms);
                    match HostSharedData.set(&key, &marker, cas) {
                        Ok(()) => {}
                        Err(store::StoreError::CasMismatch) => continue,
                        Err(_) => return None,
                    }
                    let ip = host::property(SOURCE_ADDRESS).unwrap_or_default();
                    let ip = String::from_utf8_lossy(client_ip(&ip)).into_owned();
                    let call = rocketchat_get(
                        self,
                        &rt.config,
                        &rt.config.me_path,
                        user_id,
                        token,
                        Some(&ip),
                    );
                    match call {
                        Some(_) => {
                            self.lookup = Some((user_fp, user_id.as_bytes().to_vec()));
                            self.park(rt, user_fp, parked, deadline_ms, true);
                            return Some(Action::Pause);
                        }
                        None => {
                            clear_pending(&key, user_fp);
                            active.metrics.inc(Counter::CalloutFailures);
                            active.warn_rate_limited(
                                now_ms,
                                "bypass: cannot call the me endpoint (is bypass.cluster defined in Envoy?)",
                            );
                            return None;
                        }
                    }
                }
            }
        }
        None
    }

    fn park(
        &self,
        rt: &BypassRuntime,
        user_fp: u64,
        parked: Countable,
        deadline_ms: u64,
        dispatched: bool,
    ) {
        rt.parked.borrow_mut().insert(self.context_id, parked);
        let mut lookups = rt.lookups.borrow_mut();
        let lookup = lookups.entry(user_fp).or_insert(Lookup {
            waiters: Vec::new(),
            deadline_ms,
            dispatched_here: dispatched,
        });
        if dispatched {
            lookup.dispatched_here = true;
            lookup.deadline_ms = deadline_ms;
        }
        lookup.waiters.push(self.context_id);
    }
}

/// `GET path` on the bypass cluster with these credentials, and for a caller's own lookup its
/// client IP (so a Rocket.Chat whose limiter is on counts the lookup against that client).
/// The callout's token, or `None` if Envoy refused it (e.g. no such cluster).
fn rocketchat_get<C: Context + ?Sized>(
    context: &C,
    bypass: &BypassConfig,
    path: &str,
    user_id: &str,
    token: &str,
    client_ip: Option<&str>,
) -> Option<u32> {
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
    context
        .dispatch_http_call(
            &bypass.cluster,
            headers,
            None,
            vec![],
            Duration::from_millis(bypass.timeout_ms),
        )
        .ok()
}

/// Removes our pending marker after a failed lookup, so the next request asks again.
fn clear_pending(key: &str, user_fp: u64) {
    let mut buf = Vec::new();
    if let Ok(Some(cas)) = HostSharedData.get(key, &mut buf) {
        if bypass::is_pending_for(&buf, user_fp) {
            let _ = HostSharedData.set(key, bypass::EMPTY_SLOT, cas);
        }
    }
}

impl Context for Http {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        _num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(active) = self.active.clone() else {
            return;
        };
        let Some((user_fp, user_id)) = self.lookup.take() else {
            return;
        };
        let Some(rt) = &active.bypass else { return };
        let now_ms = host::now_ms();
        let status = host::http_call_status();
        let body = host::buffer(host::BUFFER_HTTP_CALL_RESPONSE_BODY, body_size.min(1 << 20));
        let answer = bypass::parse_me(status, &body, &user_id);
        let key = bypass::user_slot_key(bypass::user_slot(user_fp));
        let verdict = match &answer {
            MeAnswer::Roles(roles) => Some(bypass::is_bypass(roles, &rt.roles.borrow())),
            MeAnswer::NotAuthenticated => Some(false),
            MeAnswer::Failure => None,
        };
        match answer {
            MeAnswer::Failure => {
                clear_pending(&key, user_fp);
                active.warn_rate_limited(
                    now_ms,
                    "bypass: me lookup failed (timeout, reset, non-200 or bad JSON); counted as a normal request",
                );
            }
            MeAnswer::Roles(_) | MeAnswer::NotAuthenticated => {
                let roles = match &answer {
                    MeAnswer::Roles(r) => r.as_slice(),
                    _ => &[],
                };
                let expires_ms = now_ms + rt.config.cache_ttl_ms;
                let value = bypass::resolved_slot(user_fp, expires_ms, roles);
                rt.remember(user_fp, expires_ms, roles.to_vec());
                let mut buf = Vec::new();
                for _ in 0..4 {
                    let Ok(Some(cas)) = HostSharedData.get(&key, &mut buf) else {
                        break;
                    };
                    // Replace our own marker or a dead slot, never another caller's fresh entry.
                    if !bypass::may_store_answer(&buf, user_fp, now_ms) {
                        break;
                    }
                    match HostSharedData.set(&key, &value, cas) {
                        Err(store::StoreError::CasMismatch) => continue,
                        _ => break,
                    }
                }
            }
        }
        active.finish_lookup(user_fp, verdict, now_ms);
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
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
        let mut credentials = None;
        // With bypass on, four request headers are needed: one host call for the whole map
        // beats four. Without it, the path comes first and the method is read only for a
        // path that can be limited: outside api_prefix (most of a Rocket.Chat's traffic) a
        // request costs one header read.
        let map;
        let countable = if active.bypass.is_some() {
            map = host::header_pairs(host::MAP_REQUEST_HEADERS);
            let [method, path, user_id, token] =
                headers::find(&map, [":method", ":path", "x-user-id", "x-auth-token"]);
            credentials = credential(user_id).zip(credential(token));
            path.and_then(|p| decision::limitable_path(&active.config, p))
                .and_then(|path| Self::classify(&active, method.unwrap_or_default(), &path))
        } else {
            let raw_path = host::header(host::MAP_REQUEST_HEADERS, ":path");
            raw_path
                .as_deref()
                .and_then(|p| decision::limitable_path(&active.config, p))
                .and_then(|path| {
                    let method =
                        host::header(host::MAP_REQUEST_HEADERS, ":method").unwrap_or_default();
                    Self::classify(&active, &method, &path)
                })
        };
        let Some(countable) = countable else {
            active.metrics.inc(Counter::NotLimited);
            return Action::Continue;
        };
        let now_ms = host::now_ms();
        if let Some(action) = self.bypass_step(&active, &countable, credentials, now_ms) {
            return action;
        }
        let outcome = active.count_and_apply(&countable, now_ms);
        self.apply(outcome)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let headers = self.headers.take().or_else(|| {
            let rt = self.active.as_ref()?.bypass.as_ref()?;
            let h = rt.parked_headers.borrow_mut().remove(&self.context_id);
            h
        });
        if let Some(h) = headers {
            let map = host::MAP_RESPONSE_HEADERS;
            host::set_header(
                map,
                "x-ratelimit-limit",
                Decimal::new(u64::from(h.limit)).as_str(),
            );
            host::set_header(
                map,
                "x-ratelimit-remaining",
                Decimal::new(u64::from(h.remaining)).as_str(),
            );
            host::set_header(map, "x-ratelimit-reset", Decimal::new(h.reset_ms).as_str());
        }
        Action::Continue
    }
}

impl Drop for Http {
    /// A request that ends while parked (client gone) leaves nothing behind.
    fn drop(&mut self) {
        let Some(rt) = self.active.as_ref().and_then(|a| a.bypass.as_ref()) else {
            return;
        };
        rt.parked.borrow_mut().remove(&self.context_id);
        rt.parked_headers.borrow_mut().remove(&self.context_id);
        for lookup in rt.lookups.borrow_mut().values_mut() {
            lookup.waiters.retain(|id| *id != self.context_id);
        }
    }
}
