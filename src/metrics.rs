//! Metric names (SPEC §8). Envoy shows them as `wasmcustom.rocketchat_ratelimit.<name>` in
//! `/stats` and as `rocketchat_ratelimit_<name>` in `/stats/prometheus` (Envoy drops the
//! `wasmcustom` namespace there).

/// The counters, in the order of [`Counter`].
pub const COUNTER_NAMES: [&str; 9] = [
    "rocketchat_ratelimit.allowed",
    "rocketchat_ratelimit.limited",
    "rocketchat_ratelimit.dry_run_limited",
    "rocketchat_ratelimit.bypassed",
    "rocketchat_ratelimit.not_limited",
    "rocketchat_ratelimit.callout_failures",
    "rocketchat_ratelimit.cas_retries",
    "rocketchat_ratelimit.store_errors",
    "rocketchat_ratelimit.table_collisions",
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
}
