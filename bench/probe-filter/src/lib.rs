//! A calibration filter: per request it makes the host calls its configuration lists, and
//! nothing else. Configuration: whitespace-separated `op[=arg][*N]` tokens, e.g.
//! `hdr=:path*2 prop=source.address cas metric rsp*3`.
//!
//! Request phase: `hdr=NAME` get a request header; `pairs` get all request headers in one call;
//! `rawpairs` get all request headers in one call, without parsing them (what a filter with its
//! own zero-copy parser would pay); `prop=a.b` get a property; `time` current time; `sget` read a 160-byte shared-data value;
//! `cas` read it and write it back with its CAS; `metric` increment a counter.
//! Response phase: `rsp` replace a response header; `radd` add a response header.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MapType, MetricType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { plan: Rc::new(Vec::new()) }) });
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

struct Root {
    plan: Rc<Vec<Op>>,
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
                _ => return false,
            };
            for _ in 0..times {
                plan.push(op.clone());
            }
        }
        self.plan = Rc::new(plan);
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
    plan: Rc<Vec<Op>>,
    sink: usize,
}

impl Context for Probe {}

impl HttpContext for Probe {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        for op in self.plan.iter() {
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
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        for op in self.plan.iter() {
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
