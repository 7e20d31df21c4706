//! rocketchat-ratelimit-wasm: Rocket.Chat's REST API rate limits, enforced at the edge by a
//! proxy-wasm filter in Envoy or Istio. See README.md and SPEC.
//!
//! Pure logic (configuration, routing, counting, the bypass lookups and parked requests,
//! responses) lives in modules free of proxy-wasm and is tested natively; `abi` (the entry
//! points the host calls), `host` (the calls into the host) and `filter` (the adapter between
//! them and the pure modules) exist only in the wasm build. See README "Architecture".

pub mod bypass;
pub mod client;
pub mod config;
pub mod decision;
pub mod edge;
pub mod fingerprint;
pub mod global;
pub mod headers;
pub mod limiter;
pub mod lookup;
pub mod metrics;
pub mod parking;
pub mod response;
pub mod rls;
pub mod route;
pub mod store;
pub mod verdicts;

#[cfg(target_arch = "wasm32")]
mod abi;
#[cfg(target_arch = "wasm32")]
mod filter;
#[cfg(target_arch = "wasm32")]
mod host;
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
mod pool;
