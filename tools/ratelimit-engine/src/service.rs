//! `ShouldRateLimit`, following envoyproxy/ratelimit's service for the case this project uses:
//! descriptors that carry a limit override.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tonic::{Request, Response, Status};

use crate::limits;
use crate::store::{Hit, RedisStore};

pub struct Engine {
    domains: HashSet<String>,
    store: Arc<RedisStore>,
}

/// A descriptor that is counted: its limit, window and where its count lands in the reply.
struct Counted {
    limit: RateLimit,
    divider: u64,
    slot: usize,
}

impl Engine {
    pub fn new(domains: impl IntoIterator<Item = String>, store: Arc<RedisStore>) -> Self {
        Self {
            domains: domains.into_iter().collect(),
            store,
        }
    }

    pub async fn decide(&self, req: RateLimitRequest) -> Result<RateLimitResponse, Status> {
        // envoyproxy/ratelimit answers both with a plain Go error, i.e. gRPC UNKNOWN.
        if req.domain.is_empty() {
            return Err(Status::unknown("rate limit domain must not be empty"));
        }
        if req.descriptors.is_empty() {
            return Err(Status::unknown(
                "rate limit descriptor list must not be empty",
            ));
        }
        // One clock reading for keys and resets alike.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| Status::internal("system clock before 1970"))?
            .as_secs();

        // Which descriptors are counted. An unknown domain has no limits at all, not even the
        // overrides; a known domain counts exactly the descriptors that carry an override (the
        // configuration's own descriptors are not read: see the README).
        let known = self.domains.contains(&req.domain);
        let mut plan: Vec<Option<Counted>> = Vec::with_capacity(req.descriptors.len());
        let mut hits = Vec::new();
        for (i, d) in req.descriptors.iter().enumerate() {
            let over = match (&d.limit, known) {
                (Some(over), true) => over,
                _ => {
                    plan.push(None);
                    continue;
                }
            };
            let divider = limits::divider(over.unit).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "descriptor {i}: limit override has no valid unit ({})",
                    over.unit
                ))
            })?;
            plan.push(Some(Counted {
                limit: RateLimit {
                    name: String::new(),
                    requests_per_unit: over.requests_per_unit,
                    unit: over.unit,
                },
                divider,
                slot: hits.len(),
            }));
            hits.push(Hit {
                key: limits::cache_key(&req.domain, &d.entries, divider, now),
                hits: limits::hits_addend(&req, d),
                expire_seconds: divider,
            });
        }

        let counts = if hits.is_empty() {
            Vec::new()
        } else {
            self.store.incr(&hits).await.map_err(Status::unavailable)?
        };

        let mut overall = Code::Ok;
        let statuses = plan
            .into_iter()
            .map(|p| match p {
                None => DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
                Some(c) => {
                    let (over, remaining) =
                        limits::verdict(counts[c.slot], c.limit.requests_per_unit);
                    if over {
                        overall = Code::OverLimit;
                    }
                    DescriptorStatus {
                        code: if over { Code::OverLimit } else { Code::Ok } as i32,
                        current_limit: Some(c.limit),
                        limit_remaining: remaining,
                        duration_until_reset: Some(PbDuration {
                            seconds: limits::until_reset(now, c.divider) as i64,
                            nanos: 0,
                        }),
                        ..Default::default()
                    }
                }
            })
            .collect();
        Ok(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl RateLimitService for Engine {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        self.decide(request.into_inner()).await.map(Response::new)
    }
}
