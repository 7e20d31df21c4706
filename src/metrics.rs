//! Metric names (SPEC §8). Envoy shows them as `wasmcustom.rocketchat_ratelimit.<name>` in
//! `/stats` and as `rocketchat_ratelimit_<name>` in `/stats/prometheus` (Envoy drops the
//! `wasmcustom` namespace there).

/// The counters, in the order of [`Counter`].
pub const COUNTER_NAMES: [&str; 14] = [
    "rocketchat_ratelimit.allowed",
    "rocketchat_ratelimit.limited",
    "rocketchat_ratelimit.dry_run_limited",
    "rocketchat_ratelimit.bypassed",
    "rocketchat_ratelimit.not_limited",
    "rocketchat_ratelimit.callout_failures",
    "rocketchat_ratelimit.cas_retries",
    "rocketchat_ratelimit.store_errors",
    "rocketchat_ratelimit.table_collisions",
    "rocketchat_ratelimit.global_calls",
    "rocketchat_ratelimit.global_failures",
    "rocketchat_ratelimit.global_cached_limited",
    "rocketchat_ratelimit.https_required",
    "rocketchat_ratelimit.lookups_refused",
];

pub const GAUGE_TRACKED_CLIENTS: &str = "rocketchat_ratelimit.tracked_clients";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Counted and within the limit.
    Allowed = 0,
    /// Rejected with 429.
    Limited = 1,
    /// Over the limit in dry-run mode, let through.
    DryRunLimited = 2,
    /// Let through uncounted: the user holds the bypass permission.
    Bypassed = 3,
    /// Not subject to limiting: filter disabled, OPTIONS/HEAD, outside `api_prefix`, or a
    /// `rateLimiterOptions: false` route.
    NotLimited = 4,
    /// A bypass callout failed (timeout, reset, non-200, bad JSON).
    CalloutFailures = 5,
    /// Compare-and-swap retries on counter updates.
    CasRetries = 6,
    /// Shared-data errors or contention past the retry bound (request let through).
    StoreErrors = 7,
    /// Requests counted in a slot shared with another bucket (full counter set).
    TableCollisions = 8,
    /// Calls made to the Rate Limit Service (SPEC §10).
    GlobalCalls = 9,
    /// Requests that followed `global.on_failure`: their engine call failed (gRPC error,
    /// timeout, unusable answer, unknown cluster) or their turn came after their deadline.
    GlobalFailures = 10,
    /// 429s answered from a local over-limit verdict, without a call.
    GlobalCachedLimited = 11,
    /// Requests with a password or a login token refused because they did not reach Envoy
    /// over TLS (SPEC §11 `https_only_login`).
    HttpsRequired = 12,
    /// Requests with unknown credentials counted without a `me` lookup, because their client
    /// had used its lookups of the minute (SPEC §11 `bypass.lookups_per_client_per_minute`).
    LookupsRefused = 13,
}

/// Metric events of one counted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Events {
    pub cas_retries: u32,
    pub collision: bool,
    /// A never-used counter slot was taken (the `tracked_clients` gauge).
    pub new_slot: bool,
    pub store_error: bool,
}

/// Counts not yet handed to Envoy.
///
/// A request adds to these; the root context's tick hands the sums to Envoy, one
/// `increment_metric` per metric that moved, so a request makes no metric host call (each
/// host call costs about a microsecond). Stats lag by at most one tick.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PendingMetrics {
    counters: [u64; COUNTER_NAMES.len()],
    tracked_clients: u64,
}

impl PendingMetrics {
    pub fn add(&mut self, counter: Counter, n: u64) {
        if let Some(pending) = self.counters.get_mut(counter as usize) {
            *pending = pending.saturating_add(n);
        }
    }

    pub fn inc(&mut self, counter: Counter) {
        self.add(counter, 1);
    }

    pub fn record(&mut self, events: &Events) {
        self.add(Counter::CasRetries, u64::from(events.cas_retries));
        if events.collision {
            self.inc(Counter::TableCollisions);
        }
        if events.store_error {
            self.inc(Counter::StoreErrors);
        }
        if events.new_slot {
            self.tracked_clients = self.tracked_clients.saturating_add(1);
        }
    }

    /// The pending counts (counters in [`COUNTER_NAMES`] order, then the gauge's increase),
    /// leaving zeros behind.
    pub fn take(&mut self) -> ([u64; COUNTER_NAMES.len()], u64) {
        let taken = (self.counters, self.tracked_clients);
        *self = PendingMetrics::default();
        taken
    }
}

/// At most one warning line a second (SPEC §7): says when a line may be written and how many
/// were held back since the last one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Throttle {
    last_ms: Option<u64>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(suppressed)`: write the line now (and say that many were suppressed).
    pub fn allow(&mut self, now_ms: u64) -> Option<u64> {
        match self.last_ms {
            Some(last) if now_ms.saturating_sub(last) < 1000 => {
                self.suppressed = self.suppressed.saturating_add(1);
                None
            }
            _ => {
                self.last_ms = Some(now_ms);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn pending_counts_are_taken_once() {
        let mut m = PendingMetrics::default();
        m.inc(Counter::Allowed);
        m.inc(Counter::Allowed);
        m.record(&Events {
            cas_retries: 3,
            collision: true,
            new_slot: true,
            store_error: false,
        });
        let (counters, tracked) = m.take();
        assert_eq!(counters[Counter::Allowed as usize], 2);
        assert_eq!(counters[Counter::CasRetries as usize], 3);
        assert_eq!(counters[Counter::TableCollisions as usize], 1);
        assert_eq!(counters[Counter::StoreErrors as usize], 0);
        assert_eq!(tracked, 1);
        assert_eq!(m.take(), ([0; COUNTER_NAMES.len()], 0));
    }

    #[test]
    fn every_counter_has_its_name() {
        for (counter, name) in [
            (Counter::Allowed, "allowed"),
            (Counter::GlobalCachedLimited, "global_cached_limited"),
            (Counter::HttpsRequired, "https_required"),
            (Counter::LookupsRefused, "lookups_refused"),
        ] {
            assert_eq!(
                COUNTER_NAMES[counter as usize],
                format!("rocketchat_ratelimit.{name}")
            );
        }
    }

    #[test]
    fn one_warning_a_second() {
        let mut t = Throttle::default();
        assert_eq!(t.allow(0), Some(0));
        assert_eq!(t.allow(10), None);
        assert_eq!(t.allow(999), None);
        assert_eq!(t.allow(1000), Some(2));
        assert_eq!(t.allow(1500), None);
        assert_eq!(t.allow(5000), Some(1));
    }
}
