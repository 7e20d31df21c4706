//! A reference Rate Limit Service for the filter's tests: the gRPC protocol
//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` and the Redis fixed-window
//! counting of envoyproxy/ratelimit (the engine operators run in production), for requests whose
//! descriptors carry a limit override. Test tooling only: never built into the filter.
//!
//! `README.md` beside `Cargo.toml` lists what it does and where it knowingly differs.

pub mod args;
pub mod config;
pub mod limits;
pub mod log;
pub mod service;
pub mod store;
