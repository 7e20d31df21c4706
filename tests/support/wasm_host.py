"""A scripted proxy-wasm 0.2.1 host on wasmtime: the filter's .wasm without Envoy.

It plays Envoy's part the way Envoy (proxy-wasm-cpp-host) does where the filter can tell:
statuses, the effective context, the CAS rules of shared data, and callouts that belong to the
root context (`http_call` dispatches on the root context whichever context asks, so a callout
outlives the request that made it, and its answer is delivered to the root context id). It
records every host call the filter makes with its arguments decoded, and lets a test drive the
callbacks one by one:

    proc = Process(now_ms=1_700_000_012_345)      # one Envoy process: shared data, clock, stats
    vm = Vm(FILTER_WASM, proc)                     # one worker's VM (several may share `proc`)
    assert vm.start('{"default": {...}}')          # root context, vm_start, on_configure
    req = vm.http({":path": "/api/v1/users.info"}, source="10.0.0.1:5555")
    req.request_headers()                          # -> Action (CONTINUE or PAUSE)
    req.response_headers()
    req.end()                                      # log, done, delete
    vm.calls                                       # [Call(name, args, context, status), ...]

Host calls are recorded as `Call`s: `name` is the import without its `proxy_` prefix, `args` the
decoded arguments (header names and values, shared-data keys, local reply status/headers/body,
callout cluster/headers, metric names...). `Call.key` is `(name, *args)`.

Faults: `vm.fail("get_shared_data", status=BAD_ARGUMENT)` makes that host call answer an error
(optionally only for arguments a predicate accepts, or only n times).

The bench's per-request cost counter (bench/hostcalls.py) subclasses `Vm` and uses its hooks.
"""

import dataclasses
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable, Optional

import wasmtime

# proxy-wasm ABI 0.2.1 statuses (WasmResult).
OK, NOT_FOUND, BAD_ARGUMENT, SERIALIZATION_FAILURE, PARSE_FAILURE = 0, 1, 2, 3, 4
INVALID_MEMORY_ACCESS, EMPTY, CAS_MISMATCH, RESULT_MISMATCH, INTERNAL_FAILURE = 6, 7, 8, 9, 10
BROKEN_CONNECTION, UNIMPLEMENTED = 11, 12

# Actions a filter callback returns.
CONTINUE, PAUSE = 0, 1

MAPS = {0: "request_headers", 1: "request_trailers", 2: "response_headers",
        3: "response_trailers", 4: "grpc_initial_metadata", 5: "grpc_trailing_metadata",
        6: "http_call_response_headers", 7: "http_call_response_trailers"}
BUFFERS = {0: "request_body", 1: "response_body", 2: "downstream_data", 3: "upstream_data",
           4: "http_call_response_body", 5: "grpc_receive_buffer", 6: "vm_configuration",
           7: "plugin_configuration", 8: "call_data"}
LOG_LEVELS = ["trace", "debug", "info", "warn", "error", "critical"]
METRIC_TYPES = {0: "counter", 1: "gauge", 2: "histogram"}
STREAMS = {0: "request", 1: "response", 2: "downstream", 3: "upstream"}


def text(b):
    """UTF-8 bytes as str; anything else stays bytes (so a test sees exactly what was sent)."""
    try:
        return b.decode()
    except UnicodeDecodeError:
        return b


def raw(v):
    return v if isinstance(v, bytes) else str(v).encode()


def encode_pairs(pairs):
    """proxy-wasm's serialized header map: count, (key size, value size)*, key\\0value\\0*."""
    out = [struct.pack("<I", len(pairs))]
    out += [struct.pack("<II", len(k), len(v)) for k, v in pairs]
    for k, v in pairs:
        out += [k, b"\0", v, b"\0"]
    return b"".join(out)


def decode_pairs(data):
    if len(data) < 4:
        return []
    n = struct.unpack_from("<I", data)[0]
    pos, sizes = 4 + 8 * n, [struct.unpack_from("<II", data, 4 + 8 * i) for i in range(n)]
    pairs = []
    for ks, vs in sizes:
        k = data[pos:pos + ks]
        pos += ks + 1
        v = data[pos:pos + vs]
        pos += vs + 1
        pairs.append((k, v))
    return pairs


class Trapped(AssertionError):
    """The module trapped (in Envoy: the VM is dead, every request on it a 503)."""


@dataclasses.dataclass
class Call:
    """One host call the filter made."""
    name: str  # the import without `proxy_` (`wasi:` prefixed for WASI)
    args: tuple  # decoded arguments
    context: int  # the effective context when it was made
    status: Optional[int] = None  # what the host answered
    result: Any = None  # what it handed back: a value read, (value, cas) of shared data...

    @property
    def key(self):
        return (self.name, *self.args)

    def __repr__(self):
        return f"<{self.context}> {self.name}{self.args!r} -> {self.status}"


class HeaderMap:
    """An ordered header map of byte strings (lower-case names, repeats allowed)."""

    def __init__(self, pairs=()):
        if isinstance(pairs, dict):
            pairs = pairs.items()
        self.pairs = [(raw(k), raw(v)) for k, v in pairs]

    def get(self, key):
        key = raw(key)
        return next((v for k, v in self.pairs if k == key), None)

    def __getitem__(self, key):
        v = self.get(key)
        if v is None:
            raise KeyError(key)
        return text(v)

    def __contains__(self, key):
        return self.get(key) is not None

    def all(self, key):
        key = raw(key)
        return [text(v) for k, v in self.pairs if k == key]

    def replace(self, key, value):
        key = raw(key)
        rest = [(k, v) for k, v in self.pairs if k != key]
        if len(rest) == len(self.pairs):
            self.pairs.append((key, raw(value)))
        else:
            i = next(i for i, (k, _) in enumerate(self.pairs) if k == key)
            self.pairs = rest[:i] + [(key, raw(value))] + rest[i:]

    def add(self, key, value):
        self.pairs.append((raw(key), raw(value)))

    def remove(self, key):
        key = raw(key)
        self.pairs = [(k, v) for k, v in self.pairs if k != key]

    def items(self):
        return [(text(k), text(v)) for k, v in self.pairs]

    def __len__(self):
        return len(self.pairs)

    def __repr__(self):
        return f"HeaderMap({self.items()!r})"


class Clock:
    """Host time: fixed (tests set and advance it) or the real clock (`Clock(None)`)."""

    def __init__(self, now_ms=None):
        self.now_ms = now_ms

    def nanos(self):
        return time.time_ns() if self.now_ms is None else int(self.now_ms) * 1_000_000

    def advance(self, ms):
        self.now_ms += ms


class Process:
    """What the VMs of one Envoy process share: shared data (with Envoy's CAS rules), the
    clock, the stats, and the clusters callouts may go to."""

    def __init__(self, now_ms=None, clusters=("rocketchat",)):
        self.clock = Clock(now_ms)
        self.shared = {}  # key (str) -> (value bytes, cas)
        self.next_cas = 0
        self.stats = {}  # metric name -> value
        self.clusters = set(clusters)

    def get(self, key):
        return self.shared.get(key)

    def set(self, key, value, cas=0):
        """Envoy's `SharedData::set`: cas 0 is unconditional; otherwise it must match."""
        if key in self.shared and cas != 0 and self.shared[key][1] != cas:
            return CAS_MISMATCH
        self.next_cas += 1
        self.shared[key] = (bytes(value), self.next_cas)
        return OK


@dataclasses.dataclass
class LocalReply:
    status: int
    details: Any
    headers: HeaderMap
    body: bytes
    grpc_status: int


@dataclasses.dataclass
class Callout:
    token: int
    context: int  # the (effective) context that asked for it; Envoy runs it on the root
    cluster: Any
    headers: HeaderMap
    body: bytes
    timeout_ms: int
    state: str = "pending"  # pending | answered | failed


class HttpStream:
    """One request through the filter (an HTTP context)."""

    def __init__(self, vm, context_id, headers, source):
        self.vm = vm
        self.id = context_id
        self.request = HeaderMap(headers)
        self.response = HeaderMap()
        self.properties = {"source.address": raw(source)} if source is not None else {}
        self.local_reply: Optional[LocalReply] = None
        self.resumed = []  # streams continued (by name), in order
        self.alive = True

    def request_headers(self, end_of_stream=True):
        return self.vm.callback("request_headers", self.id, len(self.request), int(end_of_stream))

    def response_headers(self, headers=None, end_of_stream=False):
        if headers is not None:
            self.response = HeaderMap(headers)
        elif not len(self.response):
            self.response = HeaderMap({":status": "200", "content-type": "application/json"})
        return self.vm.callback("response_headers", self.id, len(self.response),
                                int(end_of_stream))

    def response_body(self, size=16, end_of_stream=True):
        return self.vm.callback("response_body", self.id, size, int(end_of_stream))

    def log(self):
        self.vm.callback("log", self.id)

    def done(self):
        return self.vm.callback("done", self.id)

    def delete(self):
        self.vm.callback("delete", self.id)
        self.alive = False  # Envoy forgets it: host calls naming it get BadArgument
        self.vm.contexts.pop(self.id, None)

    def end(self):
        """The end of a stream as Envoy runs it: access log, done, delete."""
        self.log()
        self.done()
        self.delete()


class Vm:
    """One instance of the filter (one worker thread's VM in Envoy)."""

    _modules = {}  # (path, mtime, fuel) -> (engine, module): compile each .wasm once

    def __init__(self, wasm_path, process=None, fuel=False, vm_configuration=b""):
        self.process = process or Process()
        self.vm_configuration = raw(vm_configuration)
        self.plugin_configuration = b""
        self.calls = []  # every Call, in order
        self.record = True  # False: keep no Call (a long replay that only counts)
        self.logs = []  # (level name, message)
        self.stdout = []  # what the module wrote through WASI
        self.contexts = {}  # id -> HttpStream
        self.callouts = {}  # token -> Callout
        self.metrics = {}  # id -> (type name, metric name)
        self.tick_period_ms = None
        self.faults = []  # [name, status, predicate, times left or None]
        self.effective = 0  # the context host calls act on
        self.root_id = None
        self.next_context_id = 1
        self.next_token = 1
        self.callout_response = None  # (HeaderMap, body, trailers) while an answer is delivered
        self.status = (OK, b"")  # proxy_get_status while an answer is delivered
        path = str(Path(wasm_path))
        key = (path, os.path.getmtime(path), fuel)
        if key not in Vm._modules:
            cfg = wasmtime.Config()
            cfg.consume_fuel = fuel
            engine = wasmtime.Engine(cfg)
            Vm._modules[key] = (engine, wasmtime.Module.from_file(engine, path))
        self.engine, self.module = Vm._modules[key]
        self.store = wasmtime.Store(self.engine)
        if fuel:
            self.store.set_fuel(10**15)
        imports = [wasmtime.Func(self.store, imp.type, self._import(imp.module, imp.name, imp.type))
                   for imp in self.module.imports]
        self.instance = wasmtime.Instance(self.store, self.module, imports)
        self.exports = self.instance.exports(self.store)
        self.export_names = {e.name for e in self.module.exports}
        self.memory = self.exports["memory"]
        self._allocate = self.exports["proxy_on_memory_allocate"]

    # --- hooks for subclasses (the bench's counters) -------------------------------------------
    def on_import(self, name):
        """Every host call, by its full import name, before it runs."""

    def on_bytes_from_wasm(self, n):
        """Bytes the host read out of the module's memory."""

    def allocate(self, size):
        """`proxy_on_memory_allocate` in the module (the host handing data back)."""
        return self._allocate(self.store, size)

    def invoke(self, callback, *args):
        """Calls `proxy_on_<callback>`; a callback the module does not export is skipped, as
        Envoy skips it (`done` then answers true, the others CONTINUE)."""
        try:
            func = self.exports["proxy_on_" + callback]
        except KeyError:
            return 1 if callback == "done" else None
        mark = len(self.stdout)
        try:
            return func(self.store, *args)
        except wasmtime.Trap as e:
            said = b"".join(d for _, d in self.stdout[mark:]).decode(errors="replace").strip()
            raise Trapped(f"proxy_on_{callback}{args} trapped: {said or '(nothing on stderr)'}"
                          f"\n{e}") from None

    # --- driving --------------------------------------------------------------------------------
    @property
    def now_ms(self):
        return self.process.clock.now_ms

    def callback(self, name, context_id, *args):
        """Runs a callback with `context_id` as the current (effective) context."""
        saved, self.effective = self.effective, context_id
        try:
            return self.invoke(name, context_id, *args)
        finally:
            self.effective = saved

    def start(self, plugin_configuration="", root_id=None):
        """What Envoy does to a new VM and plugin: `_initialize`, the root context, vm_start,
        on_configure. Returns on_configure's answer."""
        if "_initialize" in self.exports:
            self.exports["_initialize"](self.store)
        self.root_id = root_id or self._new_context_id()
        self.callback("context_create", self.root_id, 0)
        self.callback("vm_start", self.root_id, len(self.vm_configuration))
        return self.configure(plugin_configuration)

    def configure(self, plugin_configuration):
        self.plugin_configuration = raw(plugin_configuration)
        return bool(self.callback("configure", self.root_id, len(self.plugin_configuration)))

    def tick(self):
        self.callback("tick", self.root_id)

    def done(self):
        """The plugin goes away (root context done)."""
        return self.callback("done", self.root_id)

    def http(self, headers=None, source="10.0.0.1:5555", method="GET", path=None):
        """A new HTTP context (on_context_create). `headers` may be a dict or pairs; `:method`
        and `:path` default to `method` and `path`."""
        pairs = list(headers.items() if isinstance(headers, dict) else (headers or []))
        names = {raw(k) for k, _ in pairs}
        base = [(":authority", "gateway"), (":method", method),
                (":path", "/api/v1/users.info" if path is None else path), (":scheme", "http")]
        pairs = [(k, v) for k, v in base if raw(k) not in names] + pairs
        stream = HttpStream(self, self._new_context_id(), pairs, source)
        self.contexts[stream.id] = stream
        self.callback("context_create", stream.id, self.root_id)
        return stream

    def pending_callouts(self):
        return [c for c in self.callouts.values() if c.state == "pending"]

    def respond(self, token, status=200, body=b"", headers=None):
        """Delivers a callout's answer (to the root context id, as Envoy does)."""
        c = self.callouts[token]
        if c.state != "pending":
            raise AssertionError(f"callout {token} is {c.state}: Envoy would not answer it")
        hdrs = HeaderMap([(":status", str(status))] + list((headers or {}).items()))
        body = raw(body)
        self.callout_response = (hdrs, body, HeaderMap())
        c.state = "answered"
        try:
            self.callback("http_call_response", self.root_id, token, len(hdrs), len(body), 0)
        finally:
            self.callout_response = None

    def fail_callout(self, token):
        """A callout that failed (reset, timeout, no healthy upstream): Envoy answers with no
        headers and no body, and proxy_get_status says BrokenConnection."""
        c = self.callouts[token]
        if c.state != "pending":
            raise AssertionError(f"callout {token} is {c.state}: Envoy would not answer it")
        c.state = "failed"
        self.status = (BROKEN_CONNECTION, b"reset")
        try:
            self.callback("http_call_response", self.root_id, token, 0, 0, 0)
        finally:
            self.status = (OK, b"")

    def fail(self, name, status, when: Optional[Callable[..., bool]] = None, times=None):
        """From now on the host call `name` answers `status` (when `when(*args)` holds, at most
        `times` times) without doing anything."""
        self.faults.append([name, status, when, times])

    def clear_faults(self):
        self.faults = []

    def take_calls(self):
        """The calls recorded since the last take."""
        calls, self.calls = self.calls, []
        return calls

    def stat(self, name):
        return self.process.stats.get(name, 0)

    def _new_context_id(self):
        i = self.next_context_id
        self.next_context_id += 1
        return i

    # --- memory ---------------------------------------------------------------------------------
    def read(self, ptr, size):
        ptr, size = ptr & 0xFFFFFFFF, size & 0xFFFFFFFF
        self.on_bytes_from_wasm(size)
        return bytes(self.memory.read(self.store, ptr, ptr + size)) if size else b""

    def write_u32(self, ptr, value):
        self.memory.write(self.store, struct.pack("<I", value & 0xFFFFFFFF), ptr & 0xFFFFFFFF)

    def give(self, data, ret_ptr, ret_size):
        """Hands bytes to the module as Envoy does: allocate in the module, copy, write back
        pointer and size."""
        p = self.allocate(len(data))
        if data:
            self.memory.write(self.store, data, p)
        self.write_u32(ret_ptr, p)
        self.write_u32(ret_size, len(data))

    # --- imports --------------------------------------------------------------------------------
    def _import(self, module, name, functype):
        if module == "env":
            short = name[len("proxy_"):] if name.startswith("proxy_") else name
            impl = getattr(self, "h_" + short, None)
        else:
            short = "wasi:" + name
            impl = getattr(self, "w_" + name, None)
        unimplemented = UNIMPLEMENTED if module == "env" else 52  # WASI ENOSYS
        has_result = len(functype.results) > 0

        def call(*args):
            self.on_import(name)
            if impl is None:
                self._record(short, args, unimplemented)
                return unimplemented if has_result else None
            return impl(*args)
        return call

    def _record(self, name, args, status, result=None):
        if self.record:
            self.calls.append(Call(name, tuple(args), self.effective, status, result))
        return status

    def _fault(self, name, args):
        for f in self.faults:
            fname, status, when, times = f
            if fname != name or (when is not None and not when(*args)) or times == 0:
                continue
            if times is not None:
                f[3] = times - 1
            return status
        return None

    def _answer(self, name, args, work):
        """Records the call; runs `work()` unless a fault answers. `work` returns a status, or
        (status, what it handed back)."""
        status, result = self._fault(name, args), None
        if status is None:
            status = work()
            if isinstance(status, tuple):
                status, result = status
        return self._record(name, args, status, result)

    def _map(self, mtype):
        ctx = self.contexts.get(self.effective)
        if mtype in (0, 1, 2, 3) and ctx is None:
            return None
        if mtype == 0:
            return ctx.request
        if mtype == 2:
            return ctx.response
        if mtype == 6 and self.callout_response is not None:
            return self.callout_response[0]
        if mtype == 7 and self.callout_response is not None:
            return self.callout_response[2]
        return None

    def h_log(self, level, ptr, size):
        msg = text(self.read(ptr, size))
        lvl = LOG_LEVELS[level] if 0 <= level < len(LOG_LEVELS) else level
        self.logs.append((lvl, msg))
        if os.environ.get("WASM_HOST_LOG"):
            print(f"log[{lvl}] {msg}")
        return self._record("log", (lvl, msg), OK)

    def h_get_log_level(self, ret):
        self.write_u32(ret, 0)
        return self._record("get_log_level", (), OK)

    def h_get_current_time_nanoseconds(self, ret):
        def work():
            self.memory.write(self.store, struct.pack("<Q", self.process.clock.nanos()),
                              ret & 0xFFFFFFFF)
            return OK
        return self._answer("get_current_time_nanoseconds", (), work)

    def h_get_buffer_bytes(self, btype, start, max_size, ret_ptr, ret_size):
        start, max_size = start & 0xFFFFFFFF, max_size & 0xFFFFFFFF
        name = BUFFERS.get(btype, btype)

        def work():
            if btype == 7:
                data = self.plugin_configuration
            elif btype == 6:
                data = self.vm_configuration
            elif btype == 4 and self.callout_response is not None:
                data = self.callout_response[1]
            else:
                return NOT_FOUND
            data = data[start:start + max_size]
            if data:  # Envoy leaves the out-pointers alone for an empty buffer
                self.give(data, ret_ptr, ret_size)
            return OK, data
        return self._answer("get_buffer_bytes", (name, start, max_size), work)

    def h_get_header_map_value(self, mtype, kptr, ksize, ret_ptr, ret_size):
        key = self.read(kptr, ksize)

        def work():
            m = self._map(mtype)
            if m is None:
                return BAD_ARGUMENT
            value = m.get(key)
            if value is None:
                return NOT_FOUND
            self.give(value, ret_ptr, ret_size)
            return OK, text(value)
        return self._answer("get_header_map_value", (MAPS.get(mtype, mtype), text(key)), work)

    def h_get_header_map_pairs(self, mtype, ret_ptr, ret_size):
        def work():
            m = self._map(mtype)
            if m is None:
                return BAD_ARGUMENT
            self.give(encode_pairs(m.pairs), ret_ptr, ret_size)
            return OK
        return self._answer("get_header_map_pairs", (MAPS.get(mtype, mtype),), work)

    def _set_header(self, name, mtype, kptr, ksize, vptr, vsize, op):
        key, value = self.read(kptr, ksize), self.read(vptr, vsize)

        def work():
            m = self._map(mtype)
            if m is None:
                return BAD_ARGUMENT
            getattr(m, op)(key, value)
            return OK
        return self._answer(name, (MAPS.get(mtype, mtype), text(key), text(value)), work)

    def h_replace_header_map_value(self, mtype, kptr, ksize, vptr, vsize):
        return self._set_header("replace_header_map_value", mtype, kptr, ksize, vptr, vsize,
                                "replace")

    def h_add_header_map_value(self, mtype, kptr, ksize, vptr, vsize):
        return self._set_header("add_header_map_value", mtype, kptr, ksize, vptr, vsize, "add")

    def h_remove_header_map_value(self, mtype, kptr, ksize):
        key = self.read(kptr, ksize)

        def work():
            m = self._map(mtype)
            if m is None:
                return BAD_ARGUMENT
            m.remove(key)
            return OK
        return self._answer("remove_header_map_value", (MAPS.get(mtype, mtype), text(key)), work)

    def h_set_header_map_pairs(self, mtype, ptr, size):
        pairs = decode_pairs(self.read(ptr, size))

        def work():
            m = self._map(mtype)
            if m is None:
                return BAD_ARGUMENT
            m.pairs = list(pairs)
            return OK
        return self._answer("set_header_map_pairs",
                            (MAPS.get(mtype, mtype), tuple((text(k), text(v)) for k, v in pairs)),
                            work)

    def h_get_property(self, pptr, psize, ret_ptr, ret_size):
        path = self.read(pptr, psize).replace(b"\0", b".").decode(errors="replace")

        def work():
            ctx = self.contexts.get(self.effective)
            value = ctx.properties.get(path) if ctx else None
            if value is None:
                return NOT_FOUND
            self.give(value, ret_ptr, ret_size)
            return OK, text(value)
        return self._answer("get_property", (path,), work)

    def h_get_shared_data(self, kptr, ksize, ret_ptr, ret_size, ret_cas):
        key = text(self.read(kptr, ksize))

        def work():
            entry = self.process.get(key)
            if entry is None:
                return NOT_FOUND
            value, cas = entry
            self.give(value, ret_ptr, ret_size)
            self.write_u32(ret_cas, cas)
            return OK, (value, cas)
        return self._answer("get_shared_data", (key,), work)

    def h_set_shared_data(self, kptr, ksize, vptr, vsize, cas):
        key, value = text(self.read(kptr, ksize)), self.read(vptr, vsize)
        cas &= 0xFFFFFFFF
        return self._answer("set_shared_data", (key, value, cas),
                            lambda: self.process.set(key, value, cas))

    def h_send_local_response(self, status, dptr, dsize, bptr, bsize, hptr, hsize, grpc):
        details, body = text(self.read(dptr, dsize)), self.read(bptr, bsize)
        headers = HeaderMap(decode_pairs(self.read(hptr, hsize)))

        def work():
            ctx = self.contexts.get(self.effective)
            if ctx is None:
                return BAD_ARGUMENT
            ctx.local_reply = LocalReply(status, details, headers, body, grpc)
            return OK
        return self._answer("send_local_response",
                            (status, details, tuple(headers.items()), text(body)), work)

    def h_http_call(self, uptr, usize, hptr, hsize, bptr, bsize, tptr, tsize, timeout, ret_token):
        cluster = text(self.read(uptr, usize))
        headers = HeaderMap(decode_pairs(self.read(hptr, hsize)))
        body = self.read(bptr, bsize)
        timeout &= 0xFFFFFFFF

        def work():
            if cluster not in self.process.clusters:
                return BAD_ARGUMENT  # Envoy: no such cluster
            if not all(h in headers for h in (":path", ":method", ":authority")):
                return BAD_ARGUMENT
            token = self.next_token
            self.next_token += 1
            self.callouts[token] = Callout(token, self.effective, cluster, headers, body, timeout)
            self.write_u32(ret_token, token)
            return OK, token
        return self._answer("http_call", (cluster, tuple(headers.items()), text(body), timeout),
                            work)

    def h_get_status(self, ret_code, ret_ptr, ret_size):
        code, message = self.status
        self.write_u32(ret_code, code)
        self.give(message, ret_ptr, ret_size)
        return self._record("get_status", (), OK)

    def h_define_metric(self, mtype, nptr, nsize, ret_id):
        name = text(self.read(nptr, nsize))

        def work():
            mid = len(self.metrics) + 1
            self.metrics[mid] = (METRIC_TYPES.get(mtype, mtype), name)
            self.process.stats.setdefault(name, 0)
            self.write_u32(ret_id, mid)
            return OK
        return self._answer("define_metric", (METRIC_TYPES.get(mtype, mtype), name), work)

    def h_increment_metric(self, mid, offset):
        kind, name = self.metrics.get(mid, (None, mid))

        def work():
            if kind is None:
                return NOT_FOUND
            if kind == "counter" and offset <= 0:
                return BAD_ARGUMENT  # Envoy refuses to decrement a counter
            self.process.stats[name] = self.process.stats.get(name, 0) + offset
            return OK
        return self._answer("increment_metric", (name, offset), work)

    def h_record_metric(self, mid, value):
        kind, name = self.metrics.get(mid, (None, mid))

        def work():
            if kind is None:
                return NOT_FOUND
            self.process.stats[name] = value
            return OK
        return self._answer("record_metric", (name, value), work)

    def h_get_metric(self, mid, ret):
        kind, name = self.metrics.get(mid, (None, mid))

        def work():
            if kind is None:
                return NOT_FOUND
            self.memory.write(self.store, struct.pack("<Q", self.process.stats.get(name, 0)), ret)
            return OK
        return self._answer("get_metric", (name,), work)

    def h_set_tick_period_milliseconds(self, period):
        def work():
            self.tick_period_ms = period
            return OK
        return self._answer("set_tick_period_milliseconds", (period,), work)

    def h_set_effective_context(self, context_id):
        def work():
            if context_id != self.root_id and context_id not in self.contexts:
                return BAD_ARGUMENT  # Envoy: no such context
            self.effective = context_id
            return OK
        return self._answer("set_effective_context", (context_id,), work)

    def h_continue_stream(self, stream):
        def work():
            ctx = self.contexts.get(self.effective)
            if ctx is None or stream not in (0, 1):
                return BAD_ARGUMENT
            ctx.resumed.append(STREAMS[stream])
            return OK
        return self._answer("continue_stream", (STREAMS.get(stream, stream),), work)

    def h_done(self):
        return self._record("done", (), OK)

    # --- WASI (what a Rust wasm32-wasip1 module may import) -----------------------------------
    def w_random_get(self, ptr, size):
        self.memory.write(self.store, os.urandom(size & 0xFFFFFFFF), ptr & 0xFFFFFFFF)
        self._record("wasi:random_get", (size,), 0)
        return 0

    def w_environ_sizes_get(self, count_ptr, size_ptr):
        self.write_u32(count_ptr, 0)
        self.write_u32(size_ptr, 0)
        return 0

    def w_environ_get(self, environ, buf):
        return 0

    def w_fd_write(self, fd, iovs, iovs_len, ret_written):
        chunks = []
        for i in range(iovs_len):
            ptr, size = struct.unpack("<II", self.read(iovs + 8 * i, 8))
            chunks.append(self.read(ptr, size))
        data = b"".join(chunks)
        self.stdout.append((fd, data))  # a panic message arrives here (fd 2) before the trap
        self.write_u32(ret_written, len(data))
        self._record("wasi:fd_write", (fd, text(data)), 0)
        return 0

    def w_proc_exit(self, code):
        self._record("wasi:proc_exit", (code,), None)
        raise RuntimeError(f"the module called proc_exit({code})")
