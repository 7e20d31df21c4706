//! The only module that calls the proxy-wasm host directly.
//!
//! The SDK's own wrappers `panic!` on any status they did not expect (a trap, and every request
//! on that worker becomes a 503). These wrappers declare the same imports with a plain `u32`
//! status and map every value, so nothing the host answers can trap the VM. They also write
//! into caller-owned buffers where the ABI allows, to keep the request path lean.

#![allow(clashing_extern_declarations)] // same imports as the SDK, with u32 instead of its enum

use std::ptr::null_mut;

use crate::store::{SharedStore, StoreError};

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;
const CAS_MISMATCH: u32 = 8;

pub const MAP_REQUEST_HEADERS: u32 = 0;
pub const MAP_RESPONSE_HEADERS: u32 = 2;
pub const MAP_HTTP_CALL_RESPONSE_HEADERS: u32 = 6;
pub const BUFFER_HTTP_CALL_RESPONSE_BODY: u32 = 4;
pub const BUFFER_GRPC_RECEIVE: u32 = 5;
pub const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;
pub const METRIC_COUNTER: u32 = 0;
pub const METRIC_GAUGE: u32 = 1;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
    fn proxy_grpc_call(
        upstream_data: *const u8,
        upstream_size: usize,
        service_name_data: *const u8,
        service_name_size: usize,
        method_name_data: *const u8,
        method_name_size: usize,
        initial_metadata_data: *const u8,
        initial_metadata_size: usize,
        message_data: *const u8,
        message_size: usize,
        timeout_ms: u32,
        return_token: *mut u32,
    ) -> u32;
}

/// Takes ownership of a host-allocated buffer (allocated through the SDK's
/// `proxy_on_memory_allocate`, i.e. a boxed slice of exactly `size` bytes).
///
/// # Safety
/// `data` must be null or come from the host with `size` bytes, as the ABI guarantees.
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

pub fn log(level: log::Level, message: &str) {
    // proxy-wasm levels: trace 0 … error 4.
    let level = match level {
        log::Level::Trace => 0,
        log::Level::Debug => 1,
        log::Level::Info => 2,
        log::Level::Warn => 3,
        log::Level::Error => 4,
    };
    // SAFETY: pointer and length of a live &str.
    unsafe {
        proxy_log(level, message.as_ptr(), message.len());
    }
}

/// A `log` backend writing to Envoy's log; the level filter is Envoy's own (`--component-log-level wasm:debug`).
pub struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        log(record.level(), &record.args().to_string());
    }
    fn flush(&self) {}
}

pub fn now_ms() -> u64 {
    let mut nanos = 0u64;
    // SAFETY: out-pointer to a local.
    let status = unsafe { proxy_get_current_time_nanoseconds(&mut nanos) };
    if status == OK {
        nanos / 1_000_000
    } else {
        0
    }
}

pub fn plugin_configuration() -> Vec<u8> {
    buffer(BUFFER_PLUGIN_CONFIGURATION, usize::MAX)
}

pub fn buffer(buffer_type: u32, max: usize) -> Vec<u8> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: out-pointers to locals; the host allocates the result.
    unsafe {
        let status = proxy_get_buffer_bytes(buffer_type, 0, max, &mut data, &mut size);
        let bytes = take(data, size);
        if status == OK {
            bytes
        } else {
            Vec::new()
        }
    }
}

/// A header value as bytes; `None` when absent or on any error.
pub fn header(map_type: u32, name: &str) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: as above.
    unsafe {
        let status =
            proxy_get_header_map_value(map_type, name.as_ptr(), name.len(), &mut data, &mut size);
        let bytes = take(data, size);
        (status == OK).then_some(bytes)
    }
}

/// The whole header map, serialized (see `headers::find`); empty on any error.
pub fn header_pairs(map_type: u32) -> Vec<u8> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: out-pointers to locals; the host allocates the result.
    unsafe {
        let status = proxy_get_header_map_pairs(map_type, &mut data, &mut size);
        let bytes = take(data, size);
        if status == OK {
            bytes
        } else {
            Vec::new()
        }
    }
}

/// Sets a header, replacing any value the upstream sent (a Rocket.Chat with its own limiter
/// still on sends its per-process `x-ratelimit-*`; the gateway's count is the one that holds).
pub fn set_header(map_type: u32, name: &str, value: &str) {
    // SAFETY: pointers and lengths of live strs.
    unsafe {
        proxy_replace_header_map_value(
            map_type,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        );
    }
}

/// A property, e.g. `b"source\0address"`.
pub fn property(path: &[u8]) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: as above.
    unsafe {
        let status = proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size);
        let bytes = take(data, size);
        (status == OK).then_some(bytes)
    }
}

/// Sends a local reply; `false` if the host refused.
pub fn send_local_response<V: AsRef<[u8]>>(
    status: u32,
    details: &str,
    headers: &[(&str, V)],
    body: &[u8],
) -> bool {
    let headers = crate::headers::serialize(headers);
    // SAFETY: pointers and lengths of live buffers.
    unsafe {
        proxy_send_local_response(
            status,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        ) == OK
    }
}

pub fn define_metric(metric_type: u32, name: &str) -> Option<u32> {
    let mut id = 0;
    // SAFETY: as above.
    let status = unsafe { proxy_define_metric(metric_type, name.as_ptr(), name.len(), &mut id) };
    (status == OK).then_some(id)
}

pub fn increment_metric(id: u32, offset: i64) {
    // SAFETY: plain values.
    unsafe {
        proxy_increment_metric(id, offset);
    }
}

pub fn set_tick_period_ms(period: u32) -> bool {
    // SAFETY: plain value.
    unsafe { proxy_set_tick_period_milliseconds(period) == OK }
}

/// Makes `context_id` the context later host calls act on (e.g. resuming another request).
pub fn set_effective_context(context_id: u32) -> bool {
    // SAFETY: plain value.
    unsafe { proxy_set_effective_context(context_id) == OK }
}

/// Resumes the effective context's paused request (Envoy defers it to after this VM call).
pub fn resume_http_request() -> bool {
    // SAFETY: plain value; 0 is the request stream.
    unsafe { proxy_continue_stream(0) == OK }
}

/// Dispatches an HTTP callout to `cluster`; its answer arrives in
/// `proxy_on_http_call_response` with the returned token. `Err(status)` for any status but
/// Ok (an unknown cluster is BadArgument in Envoy): the caller treats it as a failed lookup.
pub fn http_call(cluster: &str, headers: &[(&str, &str)], timeout_ms: u64) -> Result<u32, u32> {
    let headers = crate::headers::serialize(headers);
    let trailers = crate::headers::serialize::<&str>(&[]);
    let mut token = 0;
    // SAFETY: pointers and lengths of live buffers; out-pointer to a local.
    let status = unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            headers.as_ptr(),
            headers.len(),
            std::ptr::null(),
            0,
            trailers.as_ptr(),
            trailers.len(),
            u32::try_from(timeout_ms).unwrap_or(u32::MAX),
            &mut token,
        )
    };
    if status == OK {
        Ok(token)
    } else {
        Err(status)
    }
}

/// Dispatches a unary gRPC call to `cluster` (an Envoy cluster name); its answer arrives in
/// `proxy_on_grpc_receive` (the message in [`BUFFER_GRPC_RECEIVE`]) or, on any failure
/// (gRPC status, timeout, reset, unknown cluster once running), in `proxy_on_grpc_close`.
/// `Err(status)` for any host status but Ok.
pub fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    message: &[u8],
    timeout_ms: u64,
) -> Result<u32, u32> {
    let metadata = crate::headers::serialize::<&str>(&[]);
    let mut token = 0;
    // SAFETY: pointers and lengths of live buffers; out-pointer to a local.
    let status = unsafe {
        proxy_grpc_call(
            cluster.as_ptr(),
            cluster.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            metadata.as_ptr(),
            metadata.len(),
            message.as_ptr(),
            message.len(),
            u32::try_from(timeout_ms).unwrap_or(u32::MAX),
            &mut token,
        )
    };
    if status == OK {
        Ok(token)
    } else {
        Err(status)
    }
}

/// The HTTP status of the callout answer being delivered, if any.
pub fn http_call_status() -> Option<u16> {
    let status = header(MAP_HTTP_CALL_RESPONSE_HEADERS, ":status")?;
    std::str::from_utf8(&status).ok()?.parse().ok()
}

/// Envoy's shared data, every status mapped.
pub struct HostSharedData;

impl SharedStore for HostSharedData {
    fn get(&self, key: &str, buf: &mut Vec<u8>) -> Result<Option<u32>, StoreError> {
        let mut data = null_mut();
        let mut size = 0;
        let mut cas = 0;
        // SAFETY: as above.
        let status = unsafe {
            let status =
                proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas);
            *buf = take(data, size);
            status
        };
        match status {
            OK => Ok(Some(cas)),
            NOT_FOUND => Ok(None),
            other => Err(StoreError::Host(other)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        // SAFETY: as above.
        let status = unsafe {
            proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
        };
        match status {
            OK => Ok(()),
            CAS_MISMATCH => Err(StoreError::CasMismatch),
            other => Err(StoreError::Host(other)),
        }
    }
}
