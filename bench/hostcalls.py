#!/usr/bin/env python3
"""Counts what one request costs a proxy-wasm filter at the V8 boundary, without Envoy.

A minimal proxy-wasm 0.2.1 host (on wasmtime, `pip install wasmtime`) loads a filter's .wasm,
configures it, and replays the benchmark's traffic (bench/load.lua: 1,000 client addresses x 20
routes) through the same callbacks Envoy makes for a GET answered by a direct response:
context_create, request_headers, response_headers, response_body, log, done, delete. It
reports, per request in steady state:

- host calls the filter makes (by name), and the `proxy_on_memory_allocate` calls the host
  makes back into the module to return data (each a second boundary crossing);
- bytes copied across the boundary in each direction;
- wasm instructions executed (wasmtime fuel, one unit per instruction), per callback.

Every boundary crossing is a V8 <-> C++ transition in Envoy plus the host's own work (header
map lookups, shared-data mutex and hash map, stat lookups); see the calibration in the README.

  hostcalls.py FILTER.wasm [--config JSON] [--user ID TOKEN] [--requests N] [--json]
"""

import argparse
import collections
import json
import os
import struct
import sys
import time

import wasmtime

ROUTES = [
    "users.info", "users.list", "users.presence", "users.getPreferences", "channels.list",
    "channels.info", "channels.history", "channels.members", "groups.list", "im.list",
    "rooms.get", "rooms.info", "subscriptions.get", "chat.getMessage", "chat.search",
    "emoji-custom.list", "settings.public", "commands.list", "spotlight", "autotranslate.getSupportedLanguages",
]

MAP_REQUEST_HEADERS, MAP_RESPONSE_HEADERS = 0, 2
MAP_HTTP_CALL_RESPONSE_HEADERS = 6
BUFFER_HTTP_CALL_RESPONSE_BODY, BUFFER_PLUGIN_CONFIGURATION, BUFFER_VM_CONFIGURATION = 4, 7, 6
OK, NOT_FOUND, CAS_MISMATCH = 0, 1, 8
CALLBACKS = ["context_create", "request_headers", "response_headers", "response_body", "log", "done",
             "delete"]


# Where the replayed paths live; --outside-api moves them out of api_prefix (never limited),
# like a Rocket.Chat's assets, avatars and realtime API.
PATH_PREFIX = "/api/v1/"


def request_headers(k, user):
    a = k % 1000
    r = (k // 1000 + a) % 20
    h = [(":authority", "bench"), (":path", f"{PATH_PREFIX}{ROUTES[r]}"), (":method", "GET"),
         (":scheme", "http"), ("user-agent", "wrk"),
         ("x-forwarded-for", f"10.1.{a // 250}.{a % 250 + 1}"), ("x-forwarded-proto", "http"),
         ("x-request-id", "3bbd9d9c-2f0a-4b3a-9c59-9f5b1c3c2a7e"), ("x-envoy-expected-rq-timeout-ms", "10000")]
    if user:
        h += [("x-user-id", user[0]), ("x-auth-token", user[1])]
    return h, f"10.1.{a // 250}.{a % 250 + 1}:0"


class Host:
    def __init__(self, wasm_path, plugin_config, users):
        cfg = wasmtime.Config()
        cfg.consume_fuel = True
        self.engine = wasmtime.Engine(cfg)
        self.store = wasmtime.Store(self.engine)
        self.store.set_fuel(10**15)
        self.module = wasmtime.Module.from_file(self.engine, wasm_path)
        self.plugin_config = plugin_config.encode()
        self.users = users  # id -> (token, roles), for callouts to /me
        self.shared = {}  # key -> (value, cas)
        self.next_cas = 1
        self.metrics = []
        self.counting = False
        self.calls = collections.Counter()
        self.bytes_in = 0  # host -> wasm
        self.bytes_out = 0  # wasm -> host
        self.req = {}
        self.resp = {}
        self.pending_calls = []  # (token, headers)
        self.next_token = 1
        self.callout_answer = None
        self.trace = None  # [(event, fuel left)] of one traced request
        linker_imports = []
        for imp in self.module.imports:
            linker_imports.append(wasmtime.Func(self.store, imp.type, self._handler(imp.name), access_caller=True))
        self.instance = wasmtime.Instance(self.store, self.module, linker_imports)
        self.exports = self.instance.exports(self.store)
        self.memory = self.exports["memory"]
        self.alloc = self.exports["proxy_on_memory_allocate"]

    # --- memory helpers ---------------------------------------------------------------------
    def read(self, ptr, size):
        return bytes(self.memory.read(self.store, ptr, ptr + size)) if size else b""

    def write_u32(self, ptr, v):
        self.memory.write(self.store, struct.pack("<I", v & 0xFFFFFFFF), ptr)

    def give(self, data, ret_ptr, ret_size):
        """Returns bytes to the module the way Envoy does: allocate in the module, copy."""
        if self.counting:
            self.calls["<host->wasm> proxy_on_memory_allocate"] += 1
            self.bytes_in += len(data)
        if self.trace is not None:
            self.trace.append(("<alloc>", self.fuel()))
        p = self.alloc(self.store, len(data))
        if self.trace is not None:
            self.trace.append(("</alloc>", self.fuel()))
        if data:
            self.memory.write(self.store, data, p)
        self.write_u32(ret_ptr, p)
        self.write_u32(ret_size, len(data))

    # --- imports ------------------------------------------------------------------------------
    def _handler(self, name):
        impl = getattr(self, "h_" + name, None)

        def call(caller, *args):
            if self.counting:
                self.calls[name] += 1
            if self.trace is not None:
                self.trace.append((name, self.fuel()))
            if impl is None:
                return 0
            return impl(*args)
        return call

    def h_proxy_log(self, level, ptr, size):
        msg = self.read(ptr, size)
        if self.counting:
            self.bytes_out += size
        if os.environ.get("HOSTCALLS_LOG"):
            print(f"log[{level}] {msg.decode(errors='replace')}", file=sys.stderr)
        return OK

    def h_proxy_get_current_time_nanoseconds(self, ret):
        self.memory.write(self.store, struct.pack("<Q", time.time_ns()), ret)
        return OK

    def h_proxy_get_buffer_bytes(self, btype, start, max_size, ret_ptr, ret_size):
        if btype == BUFFER_PLUGIN_CONFIGURATION:
            data = self.plugin_config
        elif btype == BUFFER_HTTP_CALL_RESPONSE_BODY and self.callout_answer:
            data = self.callout_answer[2]
        elif btype == BUFFER_VM_CONFIGURATION:
            data = b""
        else:
            return NOT_FOUND
        start, max_size = start & 0xFFFFFFFF, max_size & 0xFFFFFFFF  # i32 arguments arrive signed
        data = data[start:start + max_size]
        self.give(data, ret_ptr, ret_size)
        return OK

    def _map(self, mtype):
        if mtype == MAP_REQUEST_HEADERS:
            return self.req
        if mtype == MAP_RESPONSE_HEADERS:
            return self.resp
        if mtype == MAP_HTTP_CALL_RESPONSE_HEADERS and self.callout_answer:
            return {":status": str(self.callout_answer[0]), "content-type": "application/json"}
        return {}

    def h_proxy_get_header_map_value(self, mtype, kptr, ksize, ret_ptr, ret_size):
        key = self.read(kptr, ksize).decode(errors="replace")
        if self.counting:
            self.bytes_out += ksize
        value = self._map(mtype).get(key)
        if value is None:
            return NOT_FOUND
        self.give(value.encode(), ret_ptr, ret_size)
        return OK

    def h_proxy_get_header_map_pairs(self, mtype, ret_ptr, ret_size):
        pairs = list(self._map(mtype).items())
        out = struct.pack("<I", len(pairs))
        for k, v in pairs:
            out += struct.pack("<II", len(k), len(v))
        for k, v in pairs:
            out += k.encode() + b"\0" + v.encode() + b"\0"
        self.give(out, ret_ptr, ret_size)
        return OK

    def _set_header(self, mtype, kptr, ksize, vptr, vsize, add=False):
        key = self.read(kptr, ksize).decode(errors="replace")
        value = self.read(vptr, vsize).decode(errors="replace")
        if self.counting:
            self.bytes_out += ksize + vsize
        self._map(mtype)[key] = value
        return OK

    def h_proxy_replace_header_map_value(self, *a):
        return self._set_header(*a)

    def h_proxy_add_header_map_value(self, *a):
        return self._set_header(*a, add=True)

    def h_proxy_get_property(self, pptr, psize, ret_ptr, ret_size):
        path = self.read(pptr, psize)
        if self.counting:
            self.bytes_out += psize
        if path == b"source\0address":
            self.give(self.source.encode(), ret_ptr, ret_size)
            return OK
        return NOT_FOUND

    def h_proxy_get_shared_data(self, kptr, ksize, ret_ptr, ret_size, ret_cas):
        key = self.read(kptr, ksize)
        if self.counting:
            self.bytes_out += ksize
        if key not in self.shared:
            return NOT_FOUND
        value, cas = self.shared[key]
        self.give(value, ret_ptr, ret_size)
        self.write_u32(ret_cas, cas)
        return OK

    def h_proxy_set_shared_data(self, kptr, ksize, vptr, vsize, cas):
        key = self.read(kptr, ksize)
        value = self.read(vptr, vsize)
        if self.counting:
            self.bytes_out += ksize + vsize
        if key in self.shared and cas != 0 and self.shared[key][1] != cas:
            return CAS_MISMATCH
        self.next_cas += 1
        self.shared[key] = (value, self.next_cas)
        return OK

    def h_proxy_define_metric(self, mtype, nptr, nsize, ret_id):
        self.metrics.append(self.read(nptr, nsize).decode())
        self.write_u32(ret_id, len(self.metrics))
        return OK

    def h_proxy_http_call(self, uptr, usize, hptr, hsize, bptr, bsize, tptr, tsize, timeout, ret_token):
        raw = self.read(hptr, hsize)
        n = struct.unpack_from("<I", raw)[0]
        sizes = [struct.unpack_from("<II", raw, 4 + 8 * i) for i in range(n)]
        pos, headers = 4 + 8 * n, {}
        for ks, vs in sizes:
            k = raw[pos:pos + ks].decode()
            pos += ks + 1
            v = raw[pos:pos + vs].decode()
            pos += vs + 1
            headers[k] = v
        token = self.next_token
        self.next_token += 1
        self.pending_calls.append((token, headers))
        self.write_u32(ret_token, token)
        return OK

    def h_random_get(self, ptr, size):
        self.memory.write(self.store, os.urandom(size), ptr)
        return 0

    def h_environ_sizes_get(self, count_ptr, size_ptr):
        self.write_u32(count_ptr, 0)
        self.write_u32(size_ptr, 0)
        return 0

    # --- callouts --------------------------------------------------------------------------
    def answer_callouts(self, context_id):
        while self.pending_calls:
            token, h = self.pending_calls.pop(0)
            path = h.get(":path", "")
            if path.endswith("/permissions.listAll"):
                body = {"update": [{"_id": "api-bypass-rate-limit", "roles": ["admin", "bot", "app"]}],
                        "remove": [], "success": True}
                status = 200
            else:
                uid, tok = h.get("x-user-id") or h.get("X-User-Id"), h.get("x-auth-token") or h.get("X-Auth-Token")
                u = self.users.get(uid)
                if u and u[0] == tok:
                    status, body = 200, {"_id": uid, "roles": u[1], "success": True}
                else:
                    status, body = 401, {"status": "error"}
            data = json.dumps(body).encode()
            self.callout_answer = (status, {}, data)
            self.call("http_call_response", context_id, token, 2, len(data), 0)
            self.callout_answer = None

    # --- driving -----------------------------------------------------------------------------
    def call(self, cb, *args):
        if self.trace is None:
            return self.exports["proxy_on_" + cb](self.store, *args)
        self.trace.append((f"[{cb}", self.fuel()))
        r = self.exports["proxy_on_" + cb](self.store, *args)
        self.trace.append((f"{cb}]", self.fuel()))
        return r

    def fuel(self):
        return self.store.get_fuel()

    def start(self, root_id=1):
        if "_initialize" in self.exports:
            self.exports["_initialize"](self.store)
        self.call("context_create", root_id, 0)
        self.call("vm_start", root_id, 0)
        ok = self.call("configure", root_id, len(self.plugin_config))
        if not ok:
            raise SystemExit("the filter refused its configuration")
        self.call("tick", root_id)
        self.answer_callouts(root_id)

    def stream(self, context_id, k, user, root_id=1):
        """One GET through every callback Envoy makes; returns fuel per callback."""
        headers, self.source = request_headers(k, user)
        self.req = dict(headers)
        self.resp = {":status": "200", "content-length": "16", "content-type": "text/plain"}
        used = {}
        f = self.fuel()
        self.call("context_create", context_id, root_id)
        used["context_create"], f = f - self.fuel(), self.fuel()
        action = self.call("request_headers", context_id, len(headers), 1)
        if action != 0:  # paused: a callout, answered at once
            self.answer_callouts(root_id)
        used["request_headers"], f = f - self.fuel(), self.fuel()
        self.call("response_headers", context_id, len(self.resp), 0)
        used["response_headers"], f = f - self.fuel(), self.fuel()
        self.call("response_body", context_id, 16, 1)
        used["response_body"], f = f - self.fuel(), self.fuel()
        self.call("log", context_id)
        used["log"], f = f - self.fuel(), self.fuel()
        self.call("done", context_id)
        used["done"], f = f - self.fuel(), self.fuel()
        self.call("delete", context_id)
        used["delete"] = f - self.fuel()
        return used, action


def profile(wasm, config, user, requests, warmup):
    users = {"alice-id": ("alice-token", ["user"]), "admin-id": ("admin-token", ["admin", "user"])}
    h = Host(wasm, config, users)
    h.start()
    ctx = 2
    for k in range(warmup):
        h.stream(ctx, k, user)
        ctx += 1
    h.counting = True
    fuel = collections.Counter()
    paused = 0
    for k in range(warmup, warmup + requests):
        used, action = h.stream(ctx, k, user)
        paused += action != 0
        fuel.update(used)
        ctx += 1
    # One more request, traced: wasm instructions between consecutive boundary events.
    h.counting = False
    h.trace = []
    h.stream(ctx, warmup + requests, user)
    trace, h.trace = h.trace, None
    segments = [(f"{a} -> {b}", fa - fb) for (a, fa), (b, fb) in zip(trace, trace[1:])]
    per = {n: c / requests for n, c in sorted(h.calls.items(), key=lambda kv: -kv[1])}
    return {
        "wasm": str(wasm),
        "wasm_bytes": os.path.getsize(wasm),
        "requests": requests,
        "paused_requests": paused,
        "host_calls_per_request": per,
        "host_calls_total_per_request": sum(v for n, v in per.items() if not n.startswith("<")),
        "crossings_per_request": sum(per.values()) + len(CALLBACKS),
        "bytes_host_to_wasm_per_request": h.bytes_in / requests,
        "bytes_wasm_to_host_per_request": h.bytes_out / requests,
        "wasm_instructions_per_request": {n: fuel[n] / requests for n in CALLBACKS},
        "wasm_instructions_total_per_request": sum(fuel.values()) / requests,
        "trace_one_request": segments,
        "response_headers_added": sorted(k for k in h.resp if k.startswith("x-ratelimit")),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("wasm")
    p.add_argument("--config", default="")
    p.add_argument("--user", nargs=2, metavar=("ID", "TOKEN"))
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=20000, help="the load cycles through 20,000 buckets: fill them all first")
    p.add_argument("--json", action="store_true")
    p.add_argument("--outside-api", action="store_true", help="paths under /assets/ instead of /api/v1/")
    p.add_argument("--trace", action="store_true", help="print the instructions between boundary events of one request")
    args = p.parse_args()
    if args.outside_api:
        global PATH_PREFIX
        PATH_PREFIX = "/assets/"
    r = profile(args.wasm, args.config, args.user, args.requests, args.warmup)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    print(f"{r['wasm']} ({r['wasm_bytes']} bytes), {r['requests']} requests after {args.warmup} warm-up")
    print(f"  boundary crossings per request: {r['crossings_per_request']:.2f} "
          f"({len(CALLBACKS)} callbacks + {r['host_calls_total_per_request']:.2f} host calls + allocations)")
    for n, v in r["host_calls_per_request"].items():
        print(f"    {v:6.2f}  {n}")
    print(f"  bytes copied per request: host->wasm {r['bytes_host_to_wasm_per_request']:.0f}, "
          f"wasm->host {r['bytes_wasm_to_host_per_request']:.0f}")
    print(f"  wasm instructions per request: {r['wasm_instructions_total_per_request']:.0f}  "
          + ", ".join(f"{n} {v:.0f}" for n, v in r["wasm_instructions_per_request"].items()))
    print(f"  paused requests: {r['paused_requests']}; response headers added: {r['response_headers_added']}")
    if args.trace:
        print("  one request, wasm instructions between boundary events ([cb = callback entry, cb] = return):")
        for label, n in r["trace_one_request"]:
            print(f"    {n:6d}  {label}")


if __name__ == "__main__":
    main()
