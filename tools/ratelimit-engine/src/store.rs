//! The Redis side: one pipeline of `INCRBY key hits` + `EXPIRE key window` per call, as
//! envoyproxy/ratelimit sends it. INCRBY is atomic in Redis, so concurrent calls never lose a
//! count (there is no read-then-write here).
//!
//! Connection handling is our own, on purpose: one multiplexed connection is shared by all calls;
//! any error drops it, and the next call opens a new one. So the engine finds a restarted Redis
//! by itself on the next call, without relying on a background reconnect. Each call's Redis work
//! (waiting for the connection, connecting, the pipeline) has one deadline, `timeout`: a Redis
//! that is down or hung gives the caller a prompt error, never a wait.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::Mutex;
use tokio::time::{timeout_at, Instant};

use crate::log::Throttled;

/// One counter to bump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub key: String,
    pub hits: u64,
    pub expire_seconds: u64,
}

pub struct RedisStore {
    client: redis::Client,
    address: String,
    timeout: Duration,
    /// The shared connection and its generation number (so that a call failing on an old
    /// connection does not throw away a newer one another call just opened).
    conn: Mutex<(u64, Option<MultiplexedConnection>)>,
    log: Arc<Throttled>,
}

impl RedisStore {
    /// `address` is `host:port`. Nothing is connected until the first call.
    pub fn new(address: &str, timeout: Duration, log: Arc<Throttled>) -> Result<Self, String> {
        let client = redis::Client::open(format!("redis://{address}/"))
            .map_err(|e| format!("--redis {address}: {e}"))?;
        Ok(Self {
            client,
            address: address.to_string(),
            timeout,
            conn: Mutex::new((0, None)),
            log,
        })
    }

    /// Adds each hit to its key and refreshes the key's expiry; returns each key's new value,
    /// in order. `Err` is a message for the gRPC status (it is also logged, throttled).
    pub async fn incr(&self, hits: &[Hit]) -> Result<Vec<u64>, String> {
        let deadline = Instant::now() + self.timeout;
        let result = self.incr_by(hits, deadline).await;
        if let Err(e) = &result {
            self.log.error(e);
        }
        result
    }

    async fn incr_by(&self, hits: &[Hit], deadline: Instant) -> Result<Vec<u64>, String> {
        let (generation, mut conn) = match timeout_at(deadline, self.connection()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("redis {}: connect: {e}", self.address)),
            Err(_) => {
                return Err(format!(
                    "redis {}: no connection within {} ms",
                    self.address,
                    self.timeout.as_millis()
                ))
            }
        };
        let mut pipe = redis::pipe();
        for h in hits {
            pipe.cmd("INCRBY").arg(&h.key).arg(h.hits);
            pipe.cmd("EXPIRE")
                .arg(&h.key)
                .arg(h.expire_seconds)
                .ignore();
        }
        let outcome = timeout_at(deadline, pipe.query_async::<Vec<i64>>(&mut conn)).await;
        let error = match outcome {
            Ok(Ok(values)) if values.len() == hits.len() => {
                // A counter someone set negative counts as 0, as an unsigned reader would not.
                return Ok(values.into_iter().map(|v| v.max(0) as u64).collect());
            }
            Ok(Ok(values)) => format!(
                "redis {}: {} replies to {} INCRBY",
                self.address,
                values.len(),
                hits.len()
            ),
            Ok(Err(e)) => format!("redis {}: {e}", self.address),
            Err(_) => format!(
                "redis {}: no reply within {} ms",
                self.address,
                self.timeout.as_millis()
            ),
        };
        self.forget(generation).await;
        Err(error)
    }

    /// The shared connection, opened when there is none.
    async fn connection(&self) -> redis::RedisResult<(u64, MultiplexedConnection)> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = &slot.1 {
            return Ok((slot.0, conn.clone()));
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        slot.0 += 1;
        slot.1 = Some(conn.clone());
        Ok((slot.0, conn))
    }

    /// Drops the shared connection if it is still the one of `generation`.
    async fn forget(&self, generation: u64) {
        let mut slot = self.conn.lock().await;
        if slot.0 == generation {
            slot.1 = None;
        }
    }

    /// Opens the connection now if Redis answers; used once at start, for an early warning.
    pub async fn probe(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        match timeout_at(deadline, self.connection()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("redis {}: {e}", self.address)),
            Err(_) => Err(format!(
                "redis {}: no connection within {} ms",
                self.address,
                self.timeout.as_millis()
            )),
        }
    }
}
