//! The built `ratelimit-engine` binary against a real `redis-server`, through the tonic client of
//! envoy-types. Every test starts its own Redis (loopback, free port, no persistence) and its own
//! engine, and stops both by handle when it ends, passes or fails. A missing `redis-server` is a
//! failure, not a skip.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::r#type::v3::RateLimitUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use tonic::transport::Channel;

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process killed and reaped when dropped, whatever the test's outcome.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

static FILES: AtomicUsize = AtomicUsize::new(0);

fn temp_path(name: &str) -> PathBuf {
    let n = FILES.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!(
        "ratelimit-engine-test-{}-{n}-{name}",
        std::process::id()
    ))
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write_config(text: &str) -> TempFile {
    let path = temp_path("config.yaml");
    std::fs::write(&path, text).unwrap();
    TempFile(path)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Redis {
    port: u16,
    process: Option<Guard>,
}

impl Redis {
    fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            process: None,
        };
        r.restart();
        r
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts redis-server on this port (again) and returns once it answers PING.
    fn restart(&mut self) {
        assert!(self.process.is_none(), "redis-server already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): these tests need it; \
                     `make redis` installs it (Debian package redis-server)"
                )
            });
        self.process = Some(Guard(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(self.port) {
            if let Some(status) = self.process.as_mut().unwrap().0.try_wait().unwrap() {
                panic!("redis-server on port {} exited: {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills redis-server (SIGKILL) and waits for it to be gone.
    fn stop(&mut self) {
        self.process = None;
    }

    fn signal(&self, signal: &str) {
        let pid = self.process.as_ref().expect("redis-server running").0.id();
        let ok = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {pid}");
    }

    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("redis://{}/", self.addr()))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

struct Engine {
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
    _process: Guard,
    _configs: Vec<TempFile>,
}

impl Engine {
    /// The built binary with one config file per domain, on a free port.
    fn start(redis: &Redis, domains: &[&str], extra: &[&str]) -> Engine {
        let configs: Vec<TempFile> = domains
            .iter()
            .map(|d| write_config(&format!("# test config\ndomain: {d}\n")))
            .collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ratelimit-engine"));
        cmd.args(["--listen", "127.0.0.1:0", "--redis", &redis.addr()]);
        for c in &configs {
            cmd.arg("--config").arg(&c.0);
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start ratelimit-engine");
        let stderr = child.stderr.take().unwrap();
        let process = Guard(child);
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let ready = line
                        .strip_prefix("ratelimit-engine listening on ")
                        .map(|rest| rest.split_whitespace().next().unwrap().to_string());
                    lines.lock().unwrap().push(line);
                    if let Some(addr) = ready {
                        let _ = ready_tx.send(addr);
                    }
                }
            });
        }
        let addr = match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => panic!("engine not ready; stderr: {:?}", lines.lock().unwrap()),
        };
        let ready = lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.starts_with("ratelimit-engine listening on "))
            .cloned()
            .unwrap();
        let expected_tail = format!("(domain {}, redis {})", domains.join(", "), redis.addr());
        assert!(ready.ends_with(&expected_tail), "ready line: {ready}");
        Engine {
            addr,
            stderr: lines,
            _process: process,
            _configs: configs,
        }
    }

    async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    fn error_lines(&self) -> usize {
        self.stderr
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("error:"))
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// Requests

fn descriptor(
    entries: &[(&str, &str)],
    limit: Option<(u32, RateLimitUnit)>,
) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        limit: limit.map(|(n, unit)| RateLimitOverride {
            requests_per_unit: n,
            unit: unit as i32,
        }),
        ..Default::default()
    }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.into(),
        descriptors,
        hits_addend: 0,
    }
}

/// The descriptor the filter sends: (client, route bucket, method) with its limit.
fn bucket(client: &str, limit: u32, unit: RateLimitUnit) -> RateLimitDescriptor {
    descriptor(
        &[
            ("client", client),
            ("route", "chat.postMessage"),
            ("method", "POST"),
        ],
        Some((limit, unit)),
    )
}

async fn call(c: &mut RateLimitServiceClient<Channel>, r: RateLimitRequest) -> RateLimitResponse {
    c.should_rate_limit(r)
        .await
        .expect("ShouldRateLimit")
        .into_inner()
}

fn limit(n: u32, unit: Unit) -> Option<RateLimit> {
    Some(RateLimit {
        name: String::new(),
        requests_per_unit: n,
        unit: unit as i32,
    })
}

fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Waits, if needed, until at least `room` seconds are left in the current window of `divider`
/// seconds, so that a test's calls all land in one window.
fn wait_for_room(divider: u64, room: f64) {
    let now = now_secs_f64();
    let left = divider as f64 - now % divider as f64;
    if left < room {
        std::thread::sleep(Duration::from_secs_f64(left + 0.05));
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_are_counted_exactly() {
    let redis = Redis::start();
    // A wide Redis budget here: this test is about atomic counting, not about the deadline, and
    // the machine may be busy compiling.
    let engine = Engine::start(&redis, &["rocketchat"], &["--redis-timeout-ms", "2000"]);
    let client = engine.client().await;
    wait_for_room(3600, 10.0);

    let mut tasks = Vec::new();
    for _ in 0..200 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            call(
                &mut c,
                request(
                    "rocketchat",
                    vec![bucket("10.1.1.1", 50, RateLimitUnit::Hour)],
                ),
            )
            .await
        }));
    }
    let mut remaining_ok = Vec::new();
    let mut over = 0;
    for t in tasks {
        let r = t.await.unwrap();
        let s = &r.statuses[0];
        assert_eq!(r.statuses.len(), 1);
        assert_eq!(s.current_limit, limit(50, Unit::Hour));
        assert_eq!(r.overall_code, s.code);
        if s.code == Code::Ok as i32 {
            remaining_ok.push(s.limit_remaining);
        } else {
            assert_eq!(s.code, Code::OverLimit as i32);
            assert_eq!(s.limit_remaining, 0);
            over += 1;
        }
    }
    remaining_ok.sort_unstable();
    assert_eq!(
        remaining_ok,
        (0..50).collect::<Vec<u32>>(),
        "each of 49..0 exactly once"
    );
    assert_eq!(over, 150);

    // Every call was counted once: the counter reads 200.
    let now = now_secs_f64() as u64;
    let key = format!(
        "rocketchat_client_10.1.1.1_route_chat.postMessage_method_POST_{}",
        now / 3600 * 3600
    );
    let mut r = redis.conn().await;
    let count: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(count, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_key_layout_expiry_and_hits_addend() {
    let redis = Redis::start();
    let engine = Engine::start(&redis, &["rocketchat"], &[]);
    let mut client = engine.client().await;
    let mut r = redis.conn().await;
    wait_for_room(60, 5.0);

    let before = now_secs_f64() as u64;
    let resp = call(
        &mut client,
        request(
            "rocketchat",
            vec![bucket("10.0.0.1", 5, RateLimitUnit::Minute)],
        ),
    )
    .await;
    let after = now_secs_f64() as u64;
    let s = &resp.statuses[0];
    assert_eq!(
        (resp.overall_code, s.code),
        (Code::Ok as i32, Code::Ok as i32)
    );
    assert_eq!(s.limit_remaining, 4);
    let reset = s.duration_until_reset.as_ref().unwrap();
    assert_eq!(reset.nanos, 0);
    assert!(
        (60 - after % 60..=60 - before % 60).contains(&(reset.seconds as u64)),
        "duration_until_reset {reset:?}"
    );

    // envoyproxy/ratelimit's layout: domain_ then key_value_ per entry, then the window start.
    let key = format!(
        "rocketchat_client_10.0.0.1_route_chat.postMessage_method_POST_{}",
        before / 60 * 60
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(keys, vec![key.clone()]);
    let get = |r: &mut redis::aio::MultiplexedConnection| {
        let mut r = r.clone();
        let key = key.clone();
        async move {
            redis::cmd("GET")
                .arg(&key)
                .query_async::<i64>(&mut r)
                .await
                .unwrap()
        }
    };
    assert_eq!(get(&mut r).await, 1);
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(
        (55..=60).contains(&ttl),
        "EXPIRE key 60 was sent: TTL {ttl}"
    );

    // The request's hits_addend counts that many.
    let mut req = request(
        "rocketchat",
        vec![bucket("10.0.0.1", 5, RateLimitUnit::Minute)],
    );
    req.hits_addend = 3;
    let resp = call(&mut client, req).await;
    assert_eq!(resp.statuses[0].limit_remaining, 1);
    assert_eq!(get(&mut r).await, 4);

    // A descriptor's own hits_addend wins, and 0 looks without counting.
    let mut d = bucket("10.0.0.1", 5, RateLimitUnit::Minute);
    d.hits_addend = Some(UInt64Value { value: 0 });
    let mut req = request("rocketchat", vec![d.clone()]);
    req.hits_addend = 3;
    let resp = call(&mut client, req).await;
    assert_eq!(
        (resp.statuses[0].code, resp.statuses[0].limit_remaining),
        (Code::Ok as i32, 1)
    );
    assert_eq!(get(&mut r).await, 4);
    d.hits_addend = Some(UInt64Value { value: 2 });
    let resp = call(&mut client, request("rocketchat", vec![d])).await;
    assert_eq!(resp.statuses[0].code, Code::OverLimit as i32);
    assert_eq!(resp.overall_code, Code::OverLimit as i32);
    assert_eq!(get(&mut r).await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_statuses_and_mixed_descriptors() {
    let redis = Redis::start();
    let engine = Engine::start(&redis, &["rocketchat"], &[]);
    let mut client = engine.client().await;
    wait_for_room(60, 5.0);

    let req = || {
        request(
            "rocketchat",
            vec![
                bucket("10.0.0.2", 2, RateLimitUnit::Minute),
                bucket("10.0.0.3", 10, RateLimitUnit::Minute),
                descriptor(&[("generic_key", "no-limit")], None),
            ],
        )
    };
    let first = call(&mut client, req()).await;
    assert_eq!(first.overall_code, Code::Ok as i32);
    assert_eq!(
        first
            .statuses
            .iter()
            .map(|s| s.limit_remaining)
            .collect::<Vec<_>>(),
        vec![1, 9, 0]
    );
    call(&mut client, req()).await;
    let before = now_secs_f64() as u64;
    let third = call(&mut client, req()).await;
    let after = now_secs_f64() as u64;
    assert_eq!(
        third.overall_code,
        Code::OverLimit as i32,
        "one descriptor over: all over"
    );
    let [over, ok, none] = &third.statuses[..] else {
        panic!("three statuses: {third:?}")
    };
    assert_eq!(over.code, Code::OverLimit as i32);
    assert_eq!(over.current_limit, limit(2, Unit::Minute));
    assert_eq!(over.limit_remaining, 0);
    let reset = over.duration_until_reset.as_ref().unwrap().seconds as u64;
    assert!(
        (60 - after % 60..=60 - before % 60).contains(&reset),
        "reset {reset}"
    );
    assert_eq!(ok.code, Code::Ok as i32);
    assert_eq!(ok.current_limit, limit(10, Unit::Minute));
    assert_eq!(ok.limit_remaining, 7);
    // No override: OK, nothing else, nothing counted.
    assert_eq!(none.code, Code::Ok as i32);
    assert_eq!(none.current_limit, None);
    assert_eq!(none.duration_until_reset, None);
    assert_eq!(none.limit_remaining, 0);
    let mut r = redis.conn().await;
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut r).await.unwrap();
    assert_eq!(size, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_window_starts_a_new_count() {
    let redis = Redis::start();
    let engine = Engine::start(&redis, &["rocketchat"], &[]);
    let mut client = engine.client().await;
    let req = || {
        request(
            "rocketchat",
            vec![bucket("10.0.0.4", 1, RateLimitUnit::Second)],
        )
    };
    call(&mut client, req()).await; // connect everything before timing matters

    // Start early in a fresh second: two calls within it, then one in the next second.
    let sleep_to_next_second = || {
        let now = now_secs_f64();
        std::thread::sleep(Duration::from_secs_f64(1.0 - now.fract() + 0.05));
    };
    sleep_to_next_second();
    let start = now_secs_f64();
    let a = call(&mut client, req()).await;
    let b = call(&mut client, req()).await;
    assert_eq!(
        start.floor(),
        now_secs_f64().floor(),
        "both calls in one second"
    );
    assert_eq!(
        (a.overall_code, a.statuses[0].limit_remaining),
        (Code::Ok as i32, 0)
    );
    assert_eq!(b.overall_code, Code::OverLimit as i32);
    assert_eq!(
        b.statuses[0].duration_until_reset.as_ref().unwrap().seconds,
        1
    );
    sleep_to_next_second();
    let c = call(&mut client, req()).await;
    assert_eq!(
        c.overall_code,
        Code::Ok as i32,
        "the next second has its own count"
    );

    let mut r = redis.conn().await;
    let key = format!(
        "rocketchat_client_10.0.0.4_route_chat.postMessage_method_POST_{}",
        start as u64 + 1
    );
    let v: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(v, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_domain_and_malformed_requests() {
    let redis = Redis::start();
    let engine = Engine::start(&redis, &["rocketchat"], &[]);
    let mut client = engine.client().await;

    // A domain the configuration does not name: no limit applies, not even an override.
    let resp = call(
        &mut client,
        request("other", vec![bucket("10.0.0.5", 0, RateLimitUnit::Minute)]),
    )
    .await;
    assert_eq!(resp.overall_code, Code::Ok as i32);
    assert_eq!(resp.statuses.len(), 1);
    assert_eq!(resp.statuses[0].code, Code::Ok as i32);
    assert_eq!(resp.statuses[0].current_limit, None);
    // The configured domain with a limit of 0: over at once (and counted).
    let resp = call(
        &mut client,
        request(
            "rocketchat",
            vec![bucket("10.0.0.5", 0, RateLimitUnit::Minute)],
        ),
    )
    .await;
    assert_eq!(resp.overall_code, Code::OverLimit as i32);
    let mut r = redis.conn().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].starts_with("rocketchat_"), "{keys:?}");

    // What envoyproxy/ratelimit refuses, with its messages (there a plain error: UNKNOWN).
    let e = client
        .should_rate_limit(request("", vec![bucket("x", 1, RateLimitUnit::Minute)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unknown);
    assert_eq!(e.message(), "rate limit domain must not be empty");
    let e = client
        .should_rate_limit(request("rocketchat", vec![]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unknown);
    assert_eq!(e.message(), "rate limit descriptor list must not be empty");
    // A limit override without a unit (envoyproxy/ratelimit would panic).
    let e = client
        .should_rate_limit(request(
            "rocketchat",
            vec![bucket("x", 1, RateLimitUnit::Unknown)],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_config_files_serve_two_domains() {
    let redis = Redis::start();
    let engine = Engine::start(&redis, &["rocketchat", "second"], &[]);
    let mut client = engine.client().await;
    for domain in ["rocketchat", "second"] {
        let resp = call(
            &mut client,
            request(domain, vec![bucket("10.0.0.6", 1, RateLimitUnit::Hour)]),
        )
        .await;
        assert_eq!(
            resp.statuses[0].current_limit,
            limit(1, Unit::Hour),
            "{domain}"
        );
    }
    let mut r = redis.conn().await;
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut r).await.unwrap();
    assert_eq!(size, 2);
}

/// One call with the deadline Envoy would give it (100 ms): the engine must answer (here: with
/// an error) well within it.
async fn call_expecting_unavailable(client: &mut RateLimitServiceClient<Channel>) -> Duration {
    let t = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_millis(100),
        client.should_rate_limit(request(
            "rocketchat",
            vec![bucket("10.0.0.7", 5, RateLimitUnit::Minute)],
        )),
    )
    .await;
    let elapsed = t.elapsed();
    match outcome {
        Err(_) => panic!("no answer within 100 ms"),
        Ok(Ok(r)) => panic!("answered without Redis: {r:?}"),
        Ok(Err(status)) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
    }
    elapsed
}

/// Calls every 20 ms until one succeeds; returns how long that took.
async fn wait_for_recovery(client: &mut RateLimitServiceClient<Channel>) -> Duration {
    let t = Instant::now();
    loop {
        let r = client
            .should_rate_limit(request(
                "rocketchat",
                vec![bucket("10.0.0.7", 5, RateLimitUnit::Minute)],
            ))
            .await;
        if r.is_ok() {
            return t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no recovery: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_fast_then_recovers_after_restart() {
    let mut redis = Redis::start();
    let engine = Engine::start(&redis, &["rocketchat"], &[]);
    let mut client = engine.client().await;
    call(
        &mut client,
        request(
            "rocketchat",
            vec![bucket("10.0.0.7", 5, RateLimitUnit::Minute)],
        ),
    )
    .await;

    redis.stop();
    let errors_before = engine.error_lines();
    let outage = Instant::now();
    let mut calls = 0;
    while outage.elapsed() < Duration::from_millis(1500) {
        let took = call_expecting_unavailable(&mut client).await;
        assert!(took < Duration::from_millis(100), "error after {took:?}");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logged = engine.error_lines() - errors_before;
    assert!(calls >= 20, "{calls} calls");
    // 1.5 s of failures: at most one line a second (2, plus one for timing slack).
    assert!(
        (1..=3).contains(&logged),
        "{logged} error lines for {calls} failed calls"
    );

    redis.restart(); // same port, empty
    let took = wait_for_recovery(&mut client).await;
    assert!(took < Duration::from_secs(1), "recovered after {took:?}");
    let resp = call(
        &mut client,
        request(
            "rocketchat",
            vec![bucket("10.0.0.7", 5, RateLimitUnit::Minute)],
        ),
    )
    .await;
    assert_eq!(resp.overall_code, Code::Ok as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_times_out_then_recovers() {
    let redis = Redis::start();
    let engine = Engine::start(&redis, &["rocketchat"], &[]);
    let mut client = engine.client().await;
    call(
        &mut client,
        request(
            "rocketchat",
            vec![bucket("10.0.0.7", 5, RateLimitUnit::Minute)],
        ),
    )
    .await;

    // SIGSTOP: the socket stays open and connects still succeed, but nothing answers.
    redis.signal("-STOP");
    let resume = scopeguard_cont(&redis);
    for _ in 0..5 {
        let took = call_expecting_unavailable(&mut client).await;
        assert!(took < Duration::from_millis(100), "error after {took:?}");
    }
    drop(resume); // SIGCONT
    let took = wait_for_recovery(&mut client).await;
    assert!(took < Duration::from_secs(1), "recovered after {took:?}");
}

/// Sends SIGCONT when dropped, so that a failing assertion does not leave Redis stopped (the
/// Redis guard kills it afterwards either way).
fn scopeguard_cont(redis: &Redis) -> impl Drop + '_ {
    struct Cont<'a>(&'a Redis);
    impl Drop for Cont<'_> {
        fn drop(&mut self) {
            self.0.signal("-CONT");
        }
    }
    Cont(redis)
}

#[test]
fn bad_command_lines_and_configs_are_refused() {
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_ratelimit-engine"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);

    let help = run(&[os("--help")]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--listen"));

    let out = run(&[os("--listen"), os("127.0.0.1:0")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--redis is required"));

    let no_domain = write_config("descriptors:\n  - key: client\n");
    let out = run(&[
        os("--listen"),
        os("127.0.0.1:0"),
        os("--redis"),
        os("127.0.0.1:1"),
        os("--config"),
        no_domain.0.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no top-level `domain:` key"), "{err}");

    let same = write_config("domain: rocketchat\n");
    let out = run(&[
        os("--listen"),
        os("127.0.0.1:0"),
        os("--redis"),
        os("127.0.0.1:1"),
        os("--config"),
        same.0.as_os_str(),
        os("--config"),
        same.0.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("duplicate domain 'rocketchat'"));
}
