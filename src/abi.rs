//! The proxy-wasm ABI 0.2.1 entry points: the host calls these, and they hand each call to
//! the root or HTTP context it names (`filter`).
//!
//! The filter owns them instead of using the proxy-wasm SDK's dispatcher because the SDK's
//! callout helpers panic on host statuses they did not expect, and its dispatcher routes an
//! HTTP callout answer only for a callout dispatched through those helpers (any other token
//! is `expect("invalid token_id")`: a trap); gRPC answers to other tokens are dropped. The
//! filter calls the host itself (`host`, every status mapped), so it must also route the
//! answers itself: `filter` keeps its callouts by token, and an answer whose request went
//! away is still used (cached for that user's next request).
//!
//! Entry points the filter does not need (bodies, trailers, logs, network filters) are not
//! exported: Envoy skips a callback the module does not export, which saves a V8 transition
//! per request for each of them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::filter::{self, Action, Http, Root};
use crate::host;

enum Context {
    Root(Rc<RefCell<Root>>),
    Http(Rc<RefCell<Http>>),
}

thread_local! {
    /// Live contexts by id (a VM is single-threaded; these are per VM).
    static CONTEXTS: RefCell<BTreeMap<u32, Context>> = const { RefCell::new(BTreeMap::new()) };
}

fn root(context_id: u32) -> Option<Rc<RefCell<Root>>> {
    CONTEXTS.with_borrow(|c| match c.get(&context_id) {
        Some(Context::Root(r)) => Some(r.clone()),
        _ => None,
    })
}

fn http(context_id: u32) -> Option<Rc<RefCell<Http>>> {
    CONTEXTS.with_borrow(|c| match c.get(&context_id) {
        Some(Context::Http(h)) => Some(h.clone()),
        _ => None,
    })
}

fn action(a: Action) -> u32 {
    match a {
        Action::Continue => 0,
        Action::Pause => 1,
    }
}

#[cfg(target_os = "wasi")]
extern "C" {
    fn __wasm_call_ctors();
}

/// Run once when the module is instantiated (a wasip1 reactor's initialiser).
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: the reactor's constructors, run once before anything else, as wasi-libc wants.
    #[cfg(target_os = "wasi")]
    unsafe {
        __wasm_call_ctors();
    }
    let _ = log::set_logger(&host::HostLogger);
    log::set_max_level(log::LevelFilter::Info);
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// The host allocates the buffers it returns (headers, shared data, properties) here: a
/// boxed slice of exactly `size` bytes, which `host::take` turns back into a `Vec`.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    let buffer = vec![0u8; size].into_boxed_slice();
    Box::into_raw(buffer).cast::<u8>()
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_context_id: u32) {
    let context = if parent_context_id == 0 {
        Context::Root(Rc::new(RefCell::new(Root::new())))
    } else if let Some(parent) = root(parent_context_id) {
        let http = parent.borrow().create_http_context(context_id);
        Context::Http(Rc::new(RefCell::new(http)))
    } else {
        return;
    };
    CONTEXTS.with_borrow_mut(|c| c.insert(context_id, context));
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_context_id: u32, _vm_configuration_size: usize) -> bool {
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(context_id: u32, _plugin_configuration_size: usize) -> bool {
    root(context_id).is_some_and(|r| r.borrow_mut().configure())
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(context_id: u32) {
    if let Some(r) = root(context_id) {
        r.borrow_mut().tick();
    }
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: bool,
) -> u32 {
    let Some(h) = http(context_id) else {
        return action(Action::Continue);
    };
    let a = h.borrow_mut().request_headers();
    action(a)
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(
    context_id: u32,
    _num_headers: usize,
    _end_of_stream: bool,
) -> u32 {
    if let Some(h) = http(context_id) {
        h.borrow_mut().response_headers();
    }
    action(Action::Continue)
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    _context_id: u32,
    token: u32,
    _num_headers: usize,
    body_size: usize,
    _num_trailers: usize,
) {
    filter::on_http_call_response(token, body_size);
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_receive(_context_id: u32, token: u32, response_size: usize) {
    filter::on_grpc_answer(token, Ok(response_size));
}

#[no_mangle]
pub extern "C" fn proxy_on_grpc_close(_context_id: u32, token: u32, status_code: u32) {
    filter::on_grpc_answer(token, Err(status_code));
}

#[no_mangle]
pub extern "C" fn proxy_on_done(context_id: u32) -> bool {
    if let Some(r) = root(context_id) {
        r.borrow_mut().done();
    }
    true
}

#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    // Dropping an HTTP context forgets it wherever it was parked.
    let removed = CONTEXTS.with_borrow_mut(|c| c.remove(&context_id));
    drop(removed);
}
