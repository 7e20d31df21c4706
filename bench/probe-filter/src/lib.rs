//! A calibration filter: per request it makes the host calls its configuration lists, and
//! nothing else. Configuration: whitespace-separated `op[=arg][*N]` tokens, e.g.
//! `hdr=:path*2 prop=source.address cas metric rsp*3`.
//!
//! Request phase: `hdr=NAME` get a request header; `pairs` get all request headers in one call;
//! `rawpairs` get all request headers in one call, without parsing them (what a filter with its
//! own zero-copy parser would pay); `prop=a.b` get a property; `time` current time; `sget` read a 160-byte shared-data value;
//! `cas` read it and write it back with its CAS; `metric` increment a counter; `reply` answer
//! with a local reply shaped like the filter's 429 (after the plan's other request-phase calls,
//! and the request then pauses, as the filter's does): status 429, `content-type`,
//! `x-ratelimit-limit` / `-remaining` / `-reset`, `retry-after` and a body of the length of
//! Rocket.Chat's (SPEC §1), all serialized once at configure time: the floor of a 429.
//! Response phase: `rsp` replace a response header; `radd` add a response header.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType, MetricType};
use std::rc::Rc;

/// The 429 of the flood of `make bench` (g): limit 1 a day, so `retry-after` and the body's
/// wait have five digits (a day is 86,400 s).
const REPLY_BODY: &str = "{\"success\":false,\"error\":\"Error, too many requests. Please slow down. You must wait 86400 seconds before trying this endpoint again. [error-too-many-requests]\"}";
const REPLY_HEADERS: [(&str, &str); 5] = [
    ("content-type", "application/json"),
    ("x-ratelimit-limit", "1"),
    ("x-ratelimit-remaining", "0"),
    ("x-ratelimit-reset", "1765000000000"),
    ("retry-after", "86400"),
];

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { plan: Rc::new(Plan::default()) }) });
}}

const KEY: &str = "bench-probe:set";

#[derive(Clone)]
enum Op {
    Header(String),
    Pairs,
    RawPairs,
    Property(Vec<String>),
    Time,
    SharedGet,
    SharedCas,
    Metric(u32),
    RespReplace(String),
    RespAdd(String),
}

#[derive(Default)]
struct Plan {
    ops: Vec<Op>,
    /// With `reply`: the 429's headers, serialized as the ABI wants them.
    reply: Option<Vec<u8>>,
}

struct Root {
    plan: Rc<Plan>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _: usize) -> bool {
        let text = hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&text).into_owned();
        let metric = hostcalls::define_metric(MetricType::Counter, "bench_probe.calls").unwrap_or(0);
        if let Ok((None, _)) = hostcalls::get_shared_data(KEY) {
            let _ = hostcalls::set_shared_data(KEY, Some(&[7u8; 160]), None);
        }
        let mut plan = Vec::new();
        let mut reply = None;
        for (i, token) in text.split_whitespace().enumerate() {
            let (op, times) = match token.rsplit_once('*') {
                Some((op, n)) => (op, n.parse().unwrap_or(1)),
                None => (token, 1),
            };
            let (name, arg) = op.split_once('=').unwrap_or((op, ""));
            let op = match name {
                "hdr" => Op::Header(arg.to_string()),
                "pairs" => Op::Pairs,
                "rawpairs" => Op::RawPairs,
                "prop" => Op::Property(arg.split('.').map(str::to_string).collect()),
                "time" => Op::Time,
                "sget" => Op::SharedGet,
                "cas" => Op::SharedCas,
                "metric" => Op::Metric(metric),
                "rsp" => Op::RespReplace(format!("x-probe-{i}")),
                "radd" => Op::RespAdd(format!("x-probe-{i}")),
                "reply" => {
                    reply = Some(serialize_pairs(&REPLY_HEADERS));
                    continue;
                }
                _ => return false,
            };
            for _ in 0..times {
                plan.push(op.clone());
            }
        }
        self.plan = Rc::new(Plan { ops: plan, reply });
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Probe { plan: self.plan.clone(), sink: 0 }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Probe {
    plan: Rc<Plan>,
    sink: usize,
}

impl Context for Probe {}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        for op in self.plan.ops.iter() {
            self.sink += match op {
                Op::Header(name) => hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
                    .ok()
                    .flatten()
                    .map_or(0, |v| v.len()),
                Op::Pairs => hostcalls::get_map(MapType::HttpRequestHeaders).map_or(0, |v| v.len()),
                Op::RawPairs => raw_pairs(),
                Op::Property(path) => {
                    let path: Vec<&str> = path.iter().map(String::as_str).collect();
                    hostcalls::get_property(path).ok().flatten().map_or(0, |v| v.len())
                }
                Op::Time => hostcalls::get_current_time().map_or(0, |_| 1),
                Op::SharedGet => match hostcalls::get_shared_data(KEY) {
                    Ok((Some(v), _)) => v.len(),
                    _ => 0,
                },
                Op::SharedCas => match hostcalls::get_shared_data(KEY) {
                    Ok((Some(mut v), cas)) => {
                        if let Some(b) = v.first_mut() {
                            *b = b.wrapping_add(1);
                        }
                        let _ = hostcalls::set_shared_data(KEY, Some(&v), cas);
                        v.len()
                    }
                    _ => 0,
                },
                Op::Metric(id) => hostcalls::increment_metric(*id, 1).map_or(0, |_| 1),
                Op::RespReplace(_) | Op::RespAdd(_) => 0,
            };
        }
        if let Some(headers) = &self.plan.reply {
            send_reply(headers);
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        for op in self.plan.ops.iter() {
            match op {
                Op::RespReplace(name) => {
                    let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some("1700000040000"));
                }
                Op::RespAdd(name) => {
                    let _ = hostcalls::add_map_value(MapType::HttpResponseHeaders, name, "1700000040000");
                }
                _ => {}
            }
        }
        Action::Continue
    }
}

extern "C" {
    fn proxy_get_header_map_pairs(map_type: u32, return_data: *mut *mut u8, return_size: *mut usize) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        details_data: *const u8,
        details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
}

/// The proxy-wasm map encoding: the count, (name length, value length) per pair, then each
/// name and value followed by a NUL.
fn serialize_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// The 429 in one host call, with the filter's details string.
fn send_reply(headers: &[u8]) {
    const DETAILS: &[u8] = b"rocketchat_ratelimit";
    // SAFETY: pointers and lengths of live slices; the host copies them.
    unsafe {
        proxy_send_local_response(
            429,
            DETAILS.as_ptr(),
            DETAILS.len(),
            REPLY_BODY.as_ptr(),
            REPLY_BODY.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        );
    }
}

/// All request headers in one call, as the serialized buffer Envoy returns (not parsed).
fn raw_pairs() -> usize {
    let mut data = std::ptr::null_mut();
    let mut size = 0;
    // SAFETY: out-pointers to locals; the host allocates the buffer through the SDK's
    // proxy_on_memory_allocate (a boxed slice of exactly `size` bytes), which we take back.
    unsafe {
        if proxy_get_header_map_pairs(0, &mut data, &mut size) == 0 && !data.is_null() {
            let v = Vec::from_raw_parts(data, size, size);
            return v.len();
        }
    }
    0
}
