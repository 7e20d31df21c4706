//! rocketchat-ratelimit-wasm: Rocket.Chat's REST API rate limits, enforced at the edge by a
//! proxy-wasm filter in Envoy or Istio. See README.md and SPEC.
//!
//! Pure logic (configuration, routing, counting, responses) lives in modules free of
//! proxy-wasm and is tested natively; `host` and `filter` are the adapter to Envoy and exist
//! only in the wasm build.

pub mod bypass;
pub mod client;
pub mod config;
pub mod decision;
pub mod fingerprint;
pub mod headers;
pub mod limiter;
pub mod metrics;
pub mod response;
pub mod route;
pub mod store;

#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;
