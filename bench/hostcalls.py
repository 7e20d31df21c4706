#!/usr/bin/env python3
"""Counts what one request costs a proxy-wasm filter at the V8 boundary, without Envoy.

The scripted proxy-wasm 0.2.1 host of the tests (tests/support/wasm_host.py, on wasmtime)
loads a filter's .wasm, configures it, and replays the benchmark's traffic (bench/load.lua:
1,000 client addresses x 20 routes) through the same callbacks Envoy makes for a GET answered
by a direct response: context_create, request_headers, response_headers, response_body, log,
done, delete (those the module exports). It reports, per request in steady state:

- host calls the filter makes (by name), and the `proxy_on_memory_allocate` calls the host
  makes back into the module to return data (each a second boundary crossing);
- bytes copied across the boundary in each direction;
- wasm instructions executed (wasmtime fuel, one unit per instruction), per callback.

Every boundary crossing is a V8 <-> C++ transition in Envoy plus the host's own work (header
map lookups, shared-data mutex and hash map, stat lookups); see the calibration in the README.

  hostcalls.py FILTER.wasm [--config JSON] [--user ID TOKEN] [--requests N] [--json]
  hostcalls.py FILTER.wasm --flood     the flood of `make bench` (g): limit 1 a day, every
                                       bucket exhausted by the warm-up, every request a 429
"""

import argparse
import collections
import json
import os
import sys
from pathlib import Path

# The proxy-wasm host itself is the one the tests drive (tests/support/wasm_host.py); this file
# adds the counting.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
from wasm_host import Process, Vm  # noqa: E402

ROUTES = [
    "users.info", "users.list", "users.presence", "users.getPreferences", "channels.list",
    "channels.info", "channels.history", "channels.members", "groups.list", "im.list",
    "rooms.get", "rooms.info", "subscriptions.get", "chat.getMessage", "chat.search",
    "emoji-custom.list", "settings.public", "commands.list", "spotlight", "autotranslate.getSupportedLanguages",
]

CALLBACKS = ["context_create", "request_headers", "response_headers", "response_body", "log", "done",
             "delete"]


# The flood of `make bench` (g): one request a day per bucket. Two warm-up cycles through the
# 20,000 buckets: the first spends each bucket's one request, the second gets every bucket's
# first 429 (the VM learns it is exhausted); every measured request is then a 429.
FLOOD_CONFIG = {"default": {"numRequestsAllowed": 1, "intervalTimeInMS": 86_400_000}}
FLOOD_WARMUP = 40_000

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


class Host(Vm):
    """The scripted host, counting what crosses the boundary: host calls by name, the
    `proxy_on_memory_allocate` calls the host makes back into the module to return data (each
    a second crossing), bytes each way, and wasm instructions (fuel) between events."""

    def __init__(self, wasm_path, plugin_config, users):
        super().__init__(wasm_path, Process(now_ms=None), fuel=True)  # the real clock
        self.record = False  # no per-call log: the counters below are all this needs
        self.start_config = plugin_config
        self.users = users  # id -> (token, roles), for callouts to /me
        self.counting = False
        self.counts = collections.Counter()
        self.bytes_in = 0  # host -> wasm
        self.bytes_out = 0  # wasm -> host
        self.trace = None  # [(event, fuel left)] of one traced request

    # --- counting hooks -------------------------------------------------------------------
    def on_import(self, name):
        if self.counting:
            self.counts[name] += 1
        if self.trace is not None:
            self.trace.append((name, self.fuel()))

    def on_bytes_from_wasm(self, n):
        if self.counting:
            self.bytes_out += n

    def allocate(self, size):
        if self.counting:
            self.counts["<host->wasm> proxy_on_memory_allocate"] += 1
            self.bytes_in += size
        if self.trace is None:
            return super().allocate(size)
        self.trace.append(("<alloc>", self.fuel()))
        p = super().allocate(size)
        self.trace.append(("</alloc>", self.fuel()))
        return p

    def invoke(self, cb, *args):
        if self.trace is None:
            return super().invoke(cb, *args)
        self.trace.append((f"[{cb}", self.fuel()))
        r = super().invoke(cb, *args)
        self.trace.append((f"{cb}]", self.fuel()))
        return r

    def fuel(self):
        return self.store.get_fuel()

    # --- callouts --------------------------------------------------------------------------
    def answer_callouts(self):
        for c in self.pending_callouts():
            path = c.headers.get(":path") or b""
            if path.endswith(b"/permissions.listAll"):
                body = {"update": [{"_id": "api-bypass-rate-limit", "roles": ["admin", "bot", "app"]}],
                        "remove": [], "success": True}
                status = 200
            else:
                uid, tok = c.headers.get("x-user-id"), c.headers.get("x-auth-token")
                u = self.users.get(uid.decode()) if uid else None
                if u and tok and u[0] == tok.decode():
                    status, body = 200, {"_id": uid.decode(), "roles": u[1], "success": True}
                else:
                    status, body = 401, {"status": "error"}
            self.respond(c.token, status, json.dumps(body), {"content-type": "application/json"})

    # --- driving -----------------------------------------------------------------------------
    def begin(self):
        if not self.start(self.start_config):
            raise SystemExit("the filter refused its configuration")
        self.tick()
        self.answer_callouts()

    def stream(self, k, user):
        """One GET through every callback Envoy makes; returns fuel per callback."""
        headers, source = request_headers(k, user)
        used = {}
        f = self.fuel()
        req = self.http(headers, source=source)
        used["context_create"], f = f - self.fuel(), self.fuel()
        action = req.request_headers(end_of_stream=True)
        if action != 0:  # paused: a callout, answered at once
            self.answer_callouts()
        used["request_headers"], f = f - self.fuel(), self.fuel()
        req.response_headers({":status": "200", "content-length": "16", "content-type": "text/plain"})
        used["response_headers"], f = f - self.fuel(), self.fuel()
        req.response_body(16, end_of_stream=True)
        used["response_body"], f = f - self.fuel(), self.fuel()
        req.log()
        used["log"], f = f - self.fuel(), self.fuel()
        req.done()
        used["done"], f = f - self.fuel(), self.fuel()
        req.delete()
        used["delete"] = f - self.fuel()
        self.last_response = req.response
        self.last_reply = req.local_reply
        return used, action


def profile(wasm, config, user, requests, warmup):
    users = {"alice-id": ("alice-token", ["user"]), "admin-id": ("admin-token", ["admin", "user"])}
    h = Host(wasm, config, users)
    h.begin()
    for k in range(warmup):
        h.stream(k, user)
    h.counting = True
    fuel = collections.Counter()
    paused = 0
    replies = collections.Counter()
    for k in range(warmup, warmup + requests):
        used, action = h.stream(k, user)
        paused += action != 0
        if h.last_reply is not None:
            replies[h.last_reply.status] += 1
        fuel.update(used)
    # One more request, traced: wasm instructions between consecutive boundary events.
    h.counting = False
    h.trace = []
    h.stream(warmup + requests, user)
    trace, h.trace = h.trace, None
    segments = [(f"{a} -> {b}", fa - fb) for (a, fa), (b, fb) in zip(trace, trace[1:])]
    per = {n: c / requests for n, c in sorted(h.counts.items(), key=lambda kv: -kv[1])}
    return {
        "wasm": str(wasm),
        "wasm_bytes": os.path.getsize(wasm),
        "requests": requests,
        "paused_requests": paused,
        "local_replies": dict(replies),
        "host_calls_per_request": per,
        "host_calls_total_per_request": sum(v for n, v in per.items() if not n.startswith("<")),
        # Envoy skips a callback the module does not export: no crossing.
        "callbacks_per_request": sum(f"proxy_on_{c}" in h.export_names for c in CALLBACKS),
        "crossings_per_request": sum(per.values())
        + sum(f"proxy_on_{c}" in h.export_names for c in CALLBACKS),
        "bytes_host_to_wasm_per_request": h.bytes_in / requests,
        "bytes_wasm_to_host_per_request": h.bytes_out / requests,
        "wasm_instructions_per_request": {n: fuel[n] / requests for n in CALLBACKS},
        "wasm_instructions_total_per_request": sum(fuel.values()) / requests,
        "trace_one_request": segments,
        "response_headers_added": sorted(k for k, _ in h.last_response.items() if k.startswith("x-ratelimit")),
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
    p.add_argument("--flood", action="store_true",
                   help=f"every request over its limit: --config {json.dumps(FLOOD_CONFIG)} (unless given),"
                        f" --warmup {FLOOD_WARMUP} (unless given)")
    args = p.parse_args()
    if args.flood:
        args.config = args.config or json.dumps(FLOOD_CONFIG)
        if args.warmup == p.get_default("warmup"):
            args.warmup = FLOOD_WARMUP
    if args.outside_api:
        global PATH_PREFIX
        PATH_PREFIX = "/assets/"
    r = profile(args.wasm, args.config, args.user, args.requests, args.warmup)
    if args.json:
        print(json.dumps(r, indent=1))
        return
    print(f"{r['wasm']} ({r['wasm_bytes']} bytes), {r['requests']} requests after {args.warmup} warm-up")
    print(f"  boundary crossings per request: {r['crossings_per_request']:.2f} "
          f"({r['callbacks_per_request']} callbacks + {r['host_calls_total_per_request']:.2f} host calls + allocations)")
    for n, v in r["host_calls_per_request"].items():
        print(f"    {v:6.2f}  {n}")
    print(f"  bytes copied per request: host->wasm {r['bytes_host_to_wasm_per_request']:.0f}, "
          f"wasm->host {r['bytes_wasm_to_host_per_request']:.0f}")
    print(f"  wasm instructions per request: {r['wasm_instructions_total_per_request']:.0f}  "
          + ", ".join(f"{n} {v:.0f}" for n, v in r["wasm_instructions_per_request"].items()))
    print(f"  paused requests: {r['paused_requests']}; local replies by status: {r['local_replies'] or 'none'};"
          f" response headers added: {r['response_headers_added']}")
    if args.trace:
        print("  one request, wasm instructions between boundary events ([cb = callback entry, cb] = return):")
        for label, n in r["trace_one_request"]:
            print(f"    {n:6d}  {label}")


if __name__ == "__main__":
    main()
