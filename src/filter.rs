//! The proxy-wasm adapter: fetches what the decision needs from Envoy, and applies the result.
//! The request phase decides (and counts); the response phase only adds headers.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

use crate::config::{self, Config};
use crate::decision::{self, Countable, Events};
use crate::fingerprint::Seed;
use crate::host::{self, HostSharedData};
use crate::metrics::{Counter, COUNTER_NAMES, GAUGE_TRACKED_CLIENTS};
use crate::response::{too_many_requests_body, wait_seconds, Decimal};
use crate::store;

const SEED_KEY: &str = "rlrc1:seed";
const SOURCE_ADDRESS: &[u8] = b"source\0address";

proxy_wasm::main! {{
    let _ = log::set_logger(&host::HostLogger);
    log::set_max_level(log::LevelFilter::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { active: None }) });
}}

/// Metric ids of this VM (every VM defines the same names; Envoy maps them to one stat).
struct Metrics {
    counters: [Option<u32>; COUNTER_NAMES.len()],
    tracked_clients: Option<u32>,
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
        }
    }

    fn add(&self, counter: Counter, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(Some(id)) = self.counters.get(counter as usize) {
            host::increment_metric(*id, i64::try_from(n).unwrap_or(i64::MAX));
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
            if let Some(id) = self.tracked_clients {
                host::increment_metric(id, 1);
            }
        }
    }
}

/// Everything a configured plugin shares with its HTTP contexts (one per VM, single-threaded).
struct Active {
    config: Config,
    seed: Seed,
    metrics: Metrics,
    /// Reused for every request: the counter key and the value read from shared data.
    key_buf: RefCell<String>,
    value_buf: RefCell<Vec<u8>>,
    /// Rate limit for warning logs under failure (at most one a second per VM).
    last_warning_ms: Cell<u64>,
    suppressed_warnings: Cell<u64>,
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
}

struct Root {
    active: Option<Rc<Active>>,
}

impl Context for Root {}

/// The process-wide hash seed: created once (by the first VM to configure, on Envoy's main
/// thread before any worker serves), then read by every VM.
fn shared_seed() -> Seed {
    let store = HostSharedData;
    let mut buf = Vec::new();
    use crate::store::SharedStore;
    if let Ok(Some(_)) = store.get(SEED_KEY, &mut buf) {
        if let Some(seed) = Seed::from_bytes(&buf) {
            return seed;
        }
    }
    let mut fresh = [0u8; 16];
    if getrandom::fill(&mut fresh).is_err() {
        // No entropy from the host: still distinct per process start.
        let t = host::now_ms();
        fresh.copy_from_slice(
            &[t.to_le_bytes(), (t ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes()].concat(),
        );
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
        let metrics = Metrics::define();
        let seed = shared_seed();
        if let Err(e) = store::ensure_table(&HostSharedData, config.counter_sets()) {
            log::error!("cannot create the counter table in shared data: {e:?}");
            return false;
        }
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
            key_buf: RefCell::new(String::with_capacity(32)),
            value_buf: RefCell::new(Vec::with_capacity(crate::limiter::SET_BYTES)),
            last_warning_ms: Cell::new(0),
            suppressed_warnings: Cell::new(0),
        }));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            active: self.active.clone(),
            headers: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The `x-ratelimit-*` values to add in the response phase.
struct RateLimitHeaders {
    limit: u32,
    remaining: u32,
    reset_ms: u64,
}

struct Http {
    active: Option<Rc<Active>>,
    headers: Option<RateLimitHeaders>,
}

impl Context for Http {}

impl Http {
    fn classify<'a>(&self, active: &'a Active) -> Option<Countable<'a>> {
        let method = host::header(host::MAP_REQUEST_HEADERS, ":method").unwrap_or_default();
        let path = host::header(host::MAP_REQUEST_HEADERS, ":path")?;
        decision::classify(&active.config, active.seed, &method, &path, || {
            host::property(SOURCE_ADDRESS)
        })
    }

    fn reject(&self, active: &Active, limit: u32, reset_ms: u64, now_ms: u64) {
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
        if active.config.retry_after {
            headers.push(("retry-after", wait_text.as_str()));
        }
        if !host::send_local_response(429, "rocketchat_ratelimit", &headers, body.as_bytes()) {
            active.warn_rate_limited(now_ms, "Envoy refused the 429 reply");
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(active) = self.active.clone() else {
            return Action::Continue;
        };
        let Some(countable) = self.classify(&active) else {
            active.metrics.inc(Counter::NotLimited);
            return Action::Continue;
        };
        let now_ms = host::now_ms();
        let (action, events) = decision::count_request(
            &active.config,
            &HostSharedData,
            &mut active.key_buf.borrow_mut(),
            &mut active.value_buf.borrow_mut(),
            &countable,
            now_ms,
        );
        active.metrics.record(&events);
        let limit = countable.limit.requests;
        match action {
            decision::Action::Pass {
                remaining,
                reset_ms,
            } => {
                active.metrics.inc(Counter::Allowed);
                self.headers = Some(RateLimitHeaders {
                    limit,
                    remaining,
                    reset_ms,
                });
                Action::Continue
            }
            decision::Action::DryRunLimited { reset_ms } => {
                active.metrics.inc(Counter::DryRunLimited);
                active
                    .warn_rate_limited(now_ms, "dry run: a request over its limit was let through");
                self.headers = Some(RateLimitHeaders {
                    limit,
                    remaining: 0,
                    reset_ms,
                });
                Action::Continue
            }
            decision::Action::Reject { reset_ms } => {
                active.metrics.inc(Counter::Limited);
                self.reject(&active, limit, reset_ms, now_ms);
                Action::Pause
            }
            decision::Action::FailOpen => {
                active.warn_rate_limited(
                    now_ms,
                    "counter store failed or stayed contended; request let through",
                );
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(h) = self.headers.take() {
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
