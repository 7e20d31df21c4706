"""The release .wasm against a scripted proxy-wasm host (tests/support/wasm_host.py): no Envoy,
every host call recorded, every callback driven by the test. Seconds, not minutes.

What it pins: the host calls of one counted request (a performance contract: see
EXPECTED CALLS below), the 429, a request parked on another worker's user lookup and resumed
by the root tick, a lookup answer that arrives after its request went away, and that nothing
a host or a client can send makes the VM trap.

Needs only FILTER_WASM, the release .wasm `make build` writes.
"""

import collections
import json
import math
import re

import pytest

from conftest import FILTER_WASM
from support.wasm_host import (BAD_ARGUMENT, CAS_MISMATCH, CONTINUE, INTERNAL_FAILURE,
                               INVALID_MEMORY_ACCESS, NOT_FOUND, OK, PAUSE, Process, Vm)

NOW_MS = 1_700_000_012_345  # 27.655 s before the end of its 60 s window
WINDOW_MS = 60_000
RESET_MS = (NOW_MS // WINDOW_MS + 1) * WINDOW_MS
DEFAULT_LIMIT = 10
BYPASS = json.dumps({"bypass": {"cluster": "rocketchat", "authority": "rocketchat",
                                "timeout_ms": 200}})
ALICE = {"x-user-id": "alice-id", "x-auth-token": "alice-token"}

# Shared-data keys, by what they hold (src/store.rs, src/bypass.rs).
COUNTER_KEY = re.compile(r"^rlrc1:\d+:\d+$")  # a counter set
USER_SLOT_KEY = re.compile(r"^rlrc1:u:\d+$")  # a user-cache slot

# --- EXPECTED CALLS ----------------------------------------------------------------------------
# The host calls of one counted request with the default configuration. Each host call is a
# V8 <-> C++ crossing in Envoy (~1 us): this list is a performance contract, pinned call for
# call (as a multiset: the order of independent reads may change). Request phase: the path and
# the method, the client address, the time, then one read and one compare-and-swap write (with
# the CAS of that read) of the client's counter set. Response phase: the three headers.
# Nothing else: the metric counts are batched per VM and handed to Envoy on the root tick.
COUNTED_REQUEST = [
    ("get_header_map_value", "request_headers", ":path"),
    ("get_header_map_value", "request_headers", ":method"),
    ("get_property", "source.address"),
    ("get_current_time_nanoseconds",),
    ("get_shared_data", "<counter set>"),
    ("set_shared_data", "<counter set>", "<value>", "<cas of the read>"),
]


def counted_response(limit, remaining, reset_ms):
    return [("replace_header_map_value", "response_headers", "x-ratelimit-limit", str(limit)),
            ("replace_header_map_value", "response_headers", "x-ratelimit-remaining",
             str(remaining)),
            ("replace_header_map_value", "response_headers", "x-ratelimit-reset", str(reset_ms))]


def too_many_requests(limit, reset_ms, now_ms):
    """Rocket.Chat's 429 (SPEC §1): status, headers, body."""
    wait = math.ceil((reset_ms - now_ms) / 1000)
    body = ('{"success":false,"error":"Error, too many requests. Please slow down. You must wait '
            f'{wait} seconds before trying this endpoint again. [error-too-many-requests]"}}')
    headers = {"content-type": "application/json", "x-ratelimit-limit": str(limit),
               "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset_ms),
               "retry-after": str(wait)}
    return 429, headers, body


# --- helpers -----------------------------------------------------------------------------------
_tables = {}  # configuration -> (shared data, next cas) right after a first VM configured it


def process(config):
    """A fresh Envoy process whose shared data holds what configuring `config` creates (the
    counter table, the user cache): as if another worker had configured first. Creating them
    costs ~30,000 host calls; each test starts from a copy instead."""
    if config not in _tables:
        p = Process(now_ms=NOW_MS)
        assert Vm(FILTER_WASM, p).start(config), "the filter refused its configuration"
        _tables[config] = (dict(p.shared), p.next_cas)
    shared, next_cas = _tables[config]
    p = Process(now_ms=NOW_MS)
    p.shared, p.next_cas = dict(shared), next_cas
    return p


def vm(config="{}", proc=None):
    v = Vm(FILTER_WASM, proc or process(config))
    assert v.start(config), f"configuration refused: {v.logs}"
    v.take_calls()
    return v


def symbolic(calls):
    """Calls as comparable tuples, with what varies by run (keys, counter bytes, CAS numbers)
    named instead."""
    read_cas = {}
    out = []
    for c in calls:
        key = c.key
        if c.name in ("get_shared_data", "set_shared_data") and COUNTER_KEY.match(c.args[0]):
            if c.name == "get_shared_data":
                read_cas[c.args[0]] = c.result[1] if c.result else None
                key = (c.name, "<counter set>")
            else:
                cas = "<cas of the read>" if c.args[2] == read_cas.get(c.args[0]) else c.args[2]
                key = (c.name, "<counter set>", "<value>", cas)
        out.append(key)
    return out


def assert_same_calls(actual, expected, what):
    got = symbolic(actual)
    assert collections.Counter(got) == collections.Counter(expected), (
        f"{what}: host calls differ\n  expected: {expected}\n  got:      {got}")


def names(calls):
    return [c.name for c in calls]


def counter_writes(calls):
    return [c for c in calls if c.name == "set_shared_data" and COUNTER_KEY.match(c.args[0])]


def ratelimit_headers(stream):
    return {k: v for k, v in stream.response.items() if k.startswith("x-ratelimit-")}


def me_answer(user_id, roles):
    return json.dumps({"_id": user_id, "roles": roles, "success": True})


# --- 1. the host calls of a counted request ----------------------------------------------------
def test_a_counted_request_makes_exactly_these_host_calls():
    v = vm()
    for n in range(1, 4):  # the first request of a bucket and the later ones cost the same
        req = v.http(path="/api/v1/users.info", source="10.1.2.3:40000")
        assert req.request_headers() == CONTINUE
        calls = v.take_calls()
        assert_same_calls(calls, COUNTED_REQUEST, f"request {n}, request phase")
        get = next(c for c in calls if c.name == "get_shared_data")
        assert calls.index(get) < calls.index(counter_writes(calls)[0]), "CAS write before read"
        assert all(c.context == req.id and c.status == OK for c in calls)

        assert req.response_headers() == CONTINUE
        assert_same_calls(v.take_calls(),
                          counted_response(DEFAULT_LIMIT, DEFAULT_LIMIT - n, RESET_MS),
                          f"request {n}, response phase")
        assert ratelimit_headers(req) == {"x-ratelimit-limit": "10",
                                          "x-ratelimit-remaining": str(DEFAULT_LIMIT - n),
                                          "x-ratelimit-reset": str(RESET_MS)}
        req.end()
        assert v.take_calls() == [], "host calls at the end of a request"

    # The counts reach Envoy on the root tick, in one call per counter that moved.
    v.tick()
    increments = [c.args for c in v.take_calls() if c.name == "increment_metric"]
    assert ("rocketchat_ratelimit.allowed", 3) in increments
    assert len(increments) == len({name for name, _ in increments})
    assert v.stat("rocketchat_ratelimit.allowed") == 3


def test_a_path_outside_the_api_costs_one_header_read():
    v = vm()
    req = v.http(path="/assets/logo.png")
    assert req.request_headers() == CONTINUE
    assert [c.key for c in v.take_calls()] == [
        ("get_header_map_value", "request_headers", ":path")]
    req.response_headers()
    assert v.take_calls() == [] and ratelimit_headers(req) == {}


# --- 2. the 429 ----------------------------------------------------------------------------------
def test_the_request_over_the_limit_gets_rocketchats_429_and_writes_nothing():
    v = vm()
    for _ in range(DEFAULT_LIMIT):
        req = v.http(path="/api/v1/channels.list", source="10.9.9.9:1")
        assert req.request_headers() == CONTINUE
        req.response_headers()
        req.end()
    v.take_calls()

    req = v.http(path="/api/v1/channels.list", source="10.9.9.9:2")
    assert req.request_headers() == PAUSE
    calls = v.take_calls()
    status, headers, body = too_many_requests(DEFAULT_LIMIT, RESET_MS, NOW_MS)
    replies = [c for c in calls if c.name == "send_local_response"]
    assert len(replies) == 1 and replies[0].context == req.id
    reply = req.local_reply
    assert reply.status == status
    assert dict(reply.headers.items()) == headers
    assert reply.body.decode() == body
    json.loads(reply.body)  # valid JSON
    assert not [c for c in calls if c.name == "set_shared_data"], "a rejected request wrote"
    assert "increment_metric" not in names(calls)

    # Envoy runs the local reply through the response phase: no second set of headers.
    req.response_headers(headers=[(":status", "429")] + list(reply.headers.items()))
    assert {k: req.response.all(k) for k in headers if k.startswith("x-ratelimit")} == {
        k: [v] for k, v in headers.items() if k.startswith("x-ratelimit")}
    req.end()
    v.tick()
    assert v.stat("rocketchat_ratelimit.limited") == 1

    # The next window counts afresh (rejections did not extend this one).
    v.process.clock.now_ms = RESET_MS
    req = v.http(path="/api/v1/channels.list", source="10.9.9.9:3")
    assert req.request_headers() == CONTINUE
    req.response_headers()
    assert ratelimit_headers(req)["x-ratelimit-remaining"] == str(DEFAULT_LIMIT - 1)


# The host calls of a request whose bucket this VM has already seen over its limit (issue 13):
# no shared-data read at all, only what the 429 itself needs.
FLOODED_REQUEST = [
    ("get_header_map_value", "request_headers", ":path"),
    ("get_header_map_value", "request_headers", ":method"),
    ("get_property", "source.address"),
    ("get_current_time_nanoseconds",),
    ("send_local_response", "<429>"),
]


def test_a_flood_costs_no_shared_data_once_this_vm_saw_the_bucket_exhausted():
    v = vm()
    other = Vm(FILTER_WASM, v.process)  # another worker of the same Envoy
    assert other.start("{}")
    for _ in range(DEFAULT_LIMIT + 1):  # the limit, then the first 429 (read, no write)
        req = v.http(path="/api/v1/flood.me", source="10.6.6.6:1")
        req.request_headers()
        req.end()
    v.take_calls()
    for n in range(3):
        req = v.http(path="/api/v1/flood.me", source="10.6.6.6:2")
        assert req.request_headers() == PAUSE
        calls = v.take_calls()
        assert sorted(c.name for c in calls) == sorted(k[0] for k in FLOODED_REQUEST), (n, calls)
        assert req.local_reply.status == 429
        req.end()
    # The other worker has not seen it yet: one read, then it knows too; still exact.
    req = other.http(path="/api/v1/flood.me", source="10.6.6.6:3")
    assert req.request_headers() == PAUSE
    assert "get_shared_data" in names(other.take_calls())
    req = other.http(path="/api/v1/flood.me", source="10.6.6.6:4")
    assert req.request_headers() == PAUSE
    assert "get_shared_data" not in names(other.take_calls())
    # A push that raises the limit asks the counter again: 2 more pass.
    assert v.configure(json.dumps({"default": {"numRequestsAllowed": DEFAULT_LIMIT + 2}}))
    v.take_calls()
    statuses = []
    for _ in range(3):
        req = v.http(path="/api/v1/flood.me", source="10.6.6.6:5")
        statuses.append(req.request_headers())
        req.end()
    assert statuses == [CONTINUE, CONTINUE, PAUSE]
    # The window's end frees it.
    v.process.clock.now_ms = RESET_MS
    req = v.http(path="/api/v1/flood.me", source="10.6.6.6:6")
    assert req.request_headers() == CONTINUE


# --- 3. a request parked on another worker's lookup, resumed by the tick -------------------------
def two_workers_one_user(roles):
    """Worker A looks alice up (its `me` callout in flight); worker B gets a request of hers
    meanwhile. Returns (a, req_a, callout, b, req_b)."""
    proc = process(BYPASS)
    a, b = vm(BYPASS, proc), vm(BYPASS, proc)
    req_a = a.http(ALICE, path="/api/v1/users.info", source="10.0.0.7:1000")
    assert req_a.request_headers() == PAUSE
    calls = a.take_calls()
    (callout,) = a.pending_callouts()
    assert callout.cluster == "rocketchat"
    assert callout.headers["x-user-id"] == "alice-id"
    assert callout.headers["x-auth-token"] == "alice-token"
    assert callout.headers[":path"] == "/api/v1/me"
    marker = [c for c in calls if c.name == "set_shared_data" and USER_SLOT_KEY.match(c.args[0])]
    assert len(marker) == 1, "worker A did not mark the lookup as pending in shared data"

    req_b = b.http(ALICE, path="/api/v1/users.info", source="10.0.0.7:1001")
    assert req_b.request_headers() == PAUSE, "worker B did not wait for A's lookup"
    assert "http_call" not in names(b.take_calls()), "worker B asked Rocket.Chat a second time"
    b.tick()  # still pending: nothing to resume
    assert "continue_stream" not in names(b.take_calls()) and req_b.resumed == []
    a.respond(callout.token, 200, me_answer("alice-id", roles))
    return a, req_a, callout, b, req_b


def resumed_by_tick(b, req_b):
    b.tick()
    calls = b.take_calls()
    switch = [i for i, c in enumerate(calls) if c.key == ("set_effective_context", req_b.id)]
    resume = [i for i, c in enumerate(calls)
              if c.name == "continue_stream" and c.context == req_b.id]
    assert switch and resume and switch[0] < resume[0], f"not resumed by the tick: {calls}"
    assert req_b.resumed == ["request"]
    return calls


def test_a_bypass_user_parked_on_another_workers_lookup_is_resumed_by_the_tick():
    a, req_a, _, b, req_b = two_workers_one_user(["user", "admin"])
    assert req_a.resumed == ["request"]  # A's own request: resumed by the answer
    assert counter_writes(a.take_calls()) == []
    calls = resumed_by_tick(b, req_b)
    assert counter_writes(calls) == [], "a bypass request was counted"
    for req in (req_a, req_b):
        req.response_headers()
        assert ratelimit_headers(req) == {}
    a.tick()
    b.tick()
    assert a.stat("rocketchat_ratelimit.bypassed") == 2


def test_a_user_without_bypass_parked_on_another_workers_lookup_is_counted_on_resume():
    a, req_a, _, b, req_b = two_workers_one_user(["user"])
    assert req_a.resumed == ["request"]
    assert len(counter_writes(a.take_calls())) == 1
    calls = resumed_by_tick(b, req_b)
    assert len(counter_writes(calls)) == 1
    req_a.response_headers()
    req_b.response_headers()
    assert ratelimit_headers(req_a)["x-ratelimit-remaining"] == "9"
    assert ratelimit_headers(req_b)["x-ratelimit-remaining"] == "8"  # one count, two workers


def test_a_lookup_lost_on_another_worker_lets_its_waiters_go_counted_after_the_deadline():
    proc = process(BYPASS)
    a, b = vm(BYPASS, proc), vm(BYPASS, proc)
    req_a = a.http(ALICE, source="10.0.0.8:1")
    assert req_a.request_headers() == PAUSE  # A's callout never answers (A's VM is gone)
    req_b = b.http(ALICE, source="10.0.0.8:2")
    assert req_b.request_headers() == PAUSE
    b.take_calls()
    proc.clock.advance(100)
    b.tick()
    assert req_b.resumed == []
    proc.clock.advance(1000)  # past timeout_ms and the grace
    resumed_by_tick(b, req_b)
    req_b.response_headers()
    assert ratelimit_headers(req_b)["x-ratelimit-remaining"] == "9"
    b.tick()
    assert b.stat("rocketchat_ratelimit.callout_failures") >= 1


# --- 4. a lookup answer after its request went away ----------------------------------------------
def test_a_lookup_answer_after_the_request_went_away_is_still_cached():
    v = vm(BYPASS)
    req = v.http(ALICE, source="10.0.0.9:1")
    assert req.request_headers() == PAUSE
    (callout,) = v.pending_callouts()
    req.end()  # the client went away while parked
    v.take_calls()

    v.respond(callout.token, 200, me_answer("alice-id", ["admin"]))  # no trap
    calls = v.take_calls()
    assert "continue_stream" not in names(calls), "resumed a request that is gone"
    assert [c for c in calls if c.name == "send_local_response"] == []
    assert req.resumed == []

    again = v.http(ALICE, source="10.0.0.9:2")
    assert again.request_headers() == CONTINUE, "the answer was not cached"
    calls = v.take_calls()
    assert "http_call" not in names(calls) and counter_writes(calls) == []
    again.response_headers()
    assert ratelimit_headers(again) == {}
    v.tick()  # and the tick finds nothing left to do for the gone request
    assert "continue_stream" not in names(v.take_calls())


@pytest.mark.parametrize("answer", [
    ("fail",), (500, "oops"), (401, '{"status":"error"}'), (200, "not json"),
    (200, me_answer("mallory-id", ["admin"])), (200, "[" * 100_000 + "]" * 100_000),
    (200, '{"_id":"alice-id","roles":' + "[" * 50_000 + "]" * 50_000 + ',"success":true}'),
    (200, json.dumps({"_id": "alice-id", "roles": ["x" * 1000] * 3000, "success": True})),
], ids=["reset", "500", "401", "bad-json", "other-user", "deep-array", "deep-roles",
        "huge-roles"])
def test_a_lookup_that_brings_no_bypass_counts_the_request(answer):
    v = vm(BYPASS)
    req = v.http(ALICE, source="10.0.0.10:1")
    assert req.request_headers() == PAUSE
    (callout,) = v.pending_callouts()
    if answer == ("fail",):
        v.fail_callout(callout.token)
    else:
        v.respond(callout.token, *answer)
    assert req.resumed == ["request"]
    req.response_headers()
    assert ratelimit_headers(req)["x-ratelimit-remaining"] == "9"


# --- garbage in: the VM never traps --------------------------------------------------------------
GARBAGE_REQUESTS = {
    "non-utf8 path": dict(path=b"/api/v1/\xff\xfeusers.info\xc3"),
    "non-utf8 path outside the api": dict(path=b"/\xff"),
    "64 KB path": dict(path="/api/v1/" + "a/" * 32_000),
    "64 KB of dot segments": dict(path="/api/v1/" + "../" * 21_000 + "users.info"),
    "percent soup": dict(path="/api/v1/%%%ZZ%00%2e%2E/%c0%af/users.info?%ff=%"),
    "empty path": dict(path=""),
    "no path, no method": dict(headers=[(":authority", "x")], drop=(":path", ":method")),
    "odd method": dict(method=b"G\xffET " * 1000),
    "2000 headers": dict(headers=[(f"x-h{i}", "v" * 100) for i in range(2000)]),
    "1 MB header": dict(headers=[("x-big", "b" * (1 << 20))]),
    "no source address": dict(source=None),
    "odd source addresses": dict(source=b"\xff\xfe:99999:[::ffff:1.2.3.4]"),
    "unix socket source": dict(source="unix:/var/run/envoy.sock"),
    "ipv6 source": dict(source="[::ffff:10.1.2.3]:443"),
    "non-utf8 credentials": dict(headers=[("x-user-id", b"\xff\xfe"), ("x-auth-token", b"\x80")]),
    "1 MB credentials": dict(headers=[("x-user-id", "u" * (1 << 20)),
                                      ("x-auth-token", "t" * (1 << 20))]),
    "empty credentials": dict(headers=[("x-user-id", ""), ("x-auth-token", "")]),
    "repeated credentials": dict(headers=[("x-user-id", "a"), ("x-user-id", "b"),
                                          ("x-auth-token", "t"), ("x-auth-token", "u")]),
}


@pytest.mark.parametrize("config", ["{}", BYPASS], ids=["default", "bypass"])
@pytest.mark.parametrize("case", list(GARBAGE_REQUESTS), ids=list(GARBAGE_REQUESTS))
def test_garbage_requests_do_not_trap(config, case):
    spec = dict(GARBAGE_REQUESTS[case])
    drop = spec.pop("drop", ())
    v = vm(config)
    req = v.http(**spec)
    for name in drop:
        req.request.remove(name)
    action = req.request_headers()  # a trap raises here
    assert action in (CONTINUE, PAUSE)
    for callout in v.pending_callouts():
        v.respond(callout.token, 401, '{"status":"error"}')
    if action == PAUSE:
        assert req.local_reply is not None or req.resumed, "paused for good"
    req.response_headers()
    req.end()
    v.tick()


SHARED_DATA_FAULTS = {
    "get: bad argument": ("get_shared_data", BAD_ARGUMENT),
    "get: invalid memory access": ("get_shared_data", INVALID_MEMORY_ACCESS),
    "get: internal failure": ("get_shared_data", INTERNAL_FAILURE),
    "get: not found, always": ("get_shared_data", NOT_FOUND),
    "get: cas mismatch": ("get_shared_data", CAS_MISMATCH),
    "get: unknown status": ("get_shared_data", 0x7FFF_FFFF),
    "set: bad argument": ("set_shared_data", BAD_ARGUMENT),
    "set: internal failure": ("set_shared_data", INTERNAL_FAILURE),
    "set: cas mismatch, always": ("set_shared_data", CAS_MISMATCH),
    "set: unknown status": ("set_shared_data", 12345),
}


@pytest.mark.parametrize("case", list(SHARED_DATA_FAULTS), ids=list(SHARED_DATA_FAULTS))
def test_shared_data_failures_let_the_request_through(case):
    call, status = SHARED_DATA_FAULTS[case]
    v = vm()
    v.fail(call, status, when=lambda key, *_: bool(COUNTER_KEY.match(key)))
    req = v.http(path="/api/v1/users.info", source="10.2.2.2:1")
    assert req.request_headers() == CONTINUE  # fail open (SPEC §7)
    calls = v.take_calls()
    assert len([c for c in calls if c.name == call]) <= 64, "unbounded retries"
    req.response_headers()
    assert ratelimit_headers(req) == {}
    req.end()
    v.tick()
    assert (v.stat("rocketchat_ratelimit.store_errors")
            + v.stat("rocketchat_ratelimit.cas_retries")) >= 1
    warnings = [m for level, m in v.logs if level == "warn"]
    assert len(warnings) <= 1, "more than one warning a second"


@pytest.mark.parametrize("call,status", [
    ("get_header_map_value", BAD_ARGUMENT), ("get_header_map_value", NOT_FOUND),
    ("get_header_map_pairs", BAD_ARGUMENT), ("get_property", NOT_FOUND),
    ("get_property", INTERNAL_FAILURE), ("get_current_time_nanoseconds", INTERNAL_FAILURE),
    ("replace_header_map_value", BAD_ARGUMENT), ("send_local_response", BAD_ARGUMENT),
    ("http_call", BAD_ARGUMENT), ("http_call", INTERNAL_FAILURE),
    ("get_buffer_bytes", NOT_FOUND), ("set_effective_context", BAD_ARGUMENT),
    ("continue_stream", BAD_ARGUMENT), ("increment_metric", NOT_FOUND),
    ("get_shared_data", BAD_ARGUMENT),
])
def test_failing_host_calls_do_not_trap(call, status):
    """Every status a host call can answer, on every path a request and a lookup take."""
    for config in ("{}", BYPASS):
        v = vm(config)
        v.fail(call, status)
        for n in range(DEFAULT_LIMIT + 2):  # through the 429
            req = v.http(ALICE if n % 2 else {}, source="10.3.3.3:1")
            action = req.request_headers()
            for callout in v.pending_callouts():
                v.respond(callout.token, 200, me_answer("alice-id", ["user"]))
            v.tick()
            assert action in (CONTINUE, PAUSE)
            req.response_headers()
            req.end()
        v.tick()


CONFIGURE_FAULTS = {
    # Each VM but the first finds the tables in shared data.
    "config unreadable": ("get_buffer_bytes", None, False),
    "metrics refused": ("define_metric", None, False),
    "tick refused": ("set_tick_period_milliseconds", None, False),
    "no time": ("get_current_time_nanoseconds", None, False),
    "shared data unreadable": ("get_shared_data", None, False),
    # The first VM creates them.
    "first read fails": ("get_shared_data", None, True),
    "first write fails": ("set_shared_data", None, True),
    "a write fails midway": ("set_shared_data", lambda key, *_: key.endswith(":77"), True),
}


@pytest.mark.parametrize("case", list(CONFIGURE_FAULTS), ids=list(CONFIGURE_FAULTS))
def test_host_failures_at_configure_do_not_trap(case):
    call, when, cold = CONFIGURE_FAULTS[case]
    v = Vm(FILTER_WASM, Process(now_ms=NOW_MS) if cold else process(BYPASS))
    v.fail(call, INTERNAL_FAILURE, when=when)
    v.start(BYPASS)  # may refuse the configuration; must not trap
    req = v.http(ALICE)
    req.request_headers()
    for callout in v.pending_callouts():
        v.respond(callout.token, 200, me_answer("alice-id", ["user"]))
    req.response_headers()
    req.end()
    v.tick()


@pytest.mark.parametrize("config", [
    b"\xff\xfe{", "{", "[]", "null", '{"default": {"numRequestsAllowed": -1}}',
    '{"routes": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"x": ' + '{"a":' * 50_000 + "1" + "}" * 50_000 + "}",
    '{"routes": [' + ",".join(['{"path": "/api/v1/a", "method": "GET"}'] * 20_000) + "]}",
    '{"enabled": true, "enabled": false}', '{"api_prefix": "' + "\\u0000" * 1000 + '"}',
], ids=["non-utf8", "truncated", "array", "null", "negative", "deep-array", "deep-object",
        "20000-routes", "repeated-field", "nul-prefix"])
def test_bad_configurations_are_refused_without_a_trap(config):
    v = Vm(FILTER_WASM, Process(now_ms=NOW_MS))
    assert v.start(config) is False
    errors = [m for level, m in v.logs if level == "error"]
    assert errors, "refused without an error log"
    # The configuration text itself is never logged (it may carry a token).
    text = config if isinstance(config, str) else config.decode(errors="replace")
    assert all(len(m) < 1000 and (len(text) < 12 or text not in m) for m in errors)


# --- 5. edge protections (issue 12, SPEC §11) ---------------------------------------------------
HTTPS_ONLY = json.dumps({"https_only_login": True})

# A request with a password or a login token that reached Envoy in clear: the path, the method,
# Envoy's view of the scheme (the header, then the connection's TLS property), and the 403.
# No time, no shared data: it is neither counted nor forwarded.
REFUSED_LOGIN = [
    ("get_header_map_value", "request_headers", ":path"),
    ("get_header_map_value", "request_headers", ":method"),
    ("get_header_map_value", "request_headers", "x-forwarded-proto"),
    ("get_property", "connection.tls_version"),
    ("send_local_response",),
]


def test_https_only_login_costs_no_host_call_outside_the_credential_paths():
    v = vm(HTTPS_ONLY)
    req = v.http(path="/api/v1/users.info", source="10.1.2.3:40000")
    assert req.request_headers() == CONTINUE
    assert_same_calls(v.take_calls(), COUNTED_REQUEST, "a counted request with https_only_login")
    req = v.http(path="/assets/logo.png")
    assert req.request_headers() == CONTINUE
    assert [c.key for c in v.take_calls()] == [
        ("get_header_map_value", "request_headers", ":path")]


@pytest.mark.parametrize("path", ["/api/v1/login", "/api/v1//login/?x=1", "/API/V1/LOGIN",
                                  "/api/v1/method.callAnon/login", "/api/v1/users.register"])
def test_a_login_in_clear_is_refused_before_anything_is_counted_or_forwarded(path):
    v = vm(HTTPS_ONLY)
    req = v.http({"x-forwarded-proto": "http"}, method="POST", path=path)
    assert req.request_headers() == PAUSE
    calls = v.take_calls()
    assert [c.key[:len(k)] if c.name != "send_local_response" else (c.name,)
            for c, k in zip(calls, REFUSED_LOGIN)] == REFUSED_LOGIN and len(calls) == 5, calls
    reply = req.local_reply
    assert reply.status == 403
    assert dict(reply.headers.items()) == {"content-type": "application/json"}
    body = json.loads(reply.body)
    assert body["success"] is False and body["errorType"] == "error-https-required"
    assert body["error"].endswith("[error-https-required]")
    req.end()
    v.tick()
    assert v.stat("rocketchat_ratelimit.https_required") == 1
    assert v.stat("rocketchat_ratelimit.allowed") == 0


def test_a_login_over_tls_is_counted_as_usual():
    v = vm(HTTPS_ONLY)
    # TLS at this Envoy: the header says http (a client may send anything when hops are
    # trusted), the connection says TLS.
    req = v.http({"x-forwarded-proto": "http"}, method="POST", path="/api/v1/login")
    req.properties["connection.tls_version"] = b"TLSv1.3"
    assert req.request_headers() == CONTINUE
    assert_same_calls(v.take_calls(), COUNTED_REQUEST + [
        ("get_header_map_value", "request_headers", "x-forwarded-proto"),
        ("get_property", "connection.tls_version")], "a login over TLS")
    req.response_headers()
    assert ratelimit_headers(req)["x-ratelimit-remaining"] == str(DEFAULT_LIMIT - 1)
    # TLS before Envoy, the scheme as Envoy's connection manager left it: no property read.
    req = v.http({"x-forwarded-proto": "https"}, method="POST", path="/api/v1/login")
    assert req.request_headers() == CONTINUE
    assert ("get_property", "connection.tls_version") not in [c.key for c in v.take_calls()]
    # A CORS preflight carries no credentials.
    req = v.http(method="OPTIONS", path="/api/v1/login")
    assert req.request_headers() == CONTINUE and req.local_reply is None


def test_with_bypass_the_scheme_comes_from_the_one_header_map_read():
    config = json.dumps({"https_only_login": True, "bypass": {"cluster": "rocketchat"}})
    v = vm(config)
    req = v.http({"x-forwarded-proto": "http"}, method="POST", path="/api/v1/login")
    assert req.request_headers() == PAUSE
    assert names(v.take_calls()) == ["get_header_map_pairs", "get_property", "send_local_response"]
    assert req.local_reply.status == 403


def test_ietf_headers_are_two_more_response_headers():
    v = vm(json.dumps({"ietf_headers": True}))
    req = v.http(path="/api/v1/users.info", source="10.1.2.3:40000")
    assert req.request_headers() == CONTINUE
    assert_same_calls(v.take_calls(), COUNTED_REQUEST, "request phase with ietf_headers")
    req.response_headers()
    wait = math.ceil((RESET_MS - NOW_MS) / 1000)
    policy, current = f'"10-per-60s";q=10;w=60', f'"10-per-60s";r=9;t={wait}'
    assert_same_calls(v.take_calls(), counted_response(DEFAULT_LIMIT, DEFAULT_LIMIT - 1, RESET_MS) + [
        ("replace_header_map_value", "response_headers", "ratelimit-policy", policy),
        ("replace_header_map_value", "response_headers", "ratelimit", current)],
        "response phase with ietf_headers")


def test_a_client_inventing_tokens_gets_its_lookups_of_the_minute_and_no_more():
    config = json.dumps({"bypass": {"cluster": "rocketchat", "lookups_per_client_per_minute": 2}})
    v = vm(config)
    lookups = []
    for n in range(4):
        req = v.http({"x-user-id": "mallory-id", "x-auth-token": f"fresh-{n}"}, source="10.7.7.7:1")
        action = req.request_headers()
        callouts = v.pending_callouts()
        lookups.append(len(callouts))
        for callout in callouts:
            v.respond(callout.token, 401, '{"status":"error"}')
        assert action == CONTINUE or req.resumed == ["request"]
        req.response_headers()
        assert ratelimit_headers(req)["x-ratelimit-remaining"] == str(DEFAULT_LIMIT - 1 - n)
        req.end()
    assert lookups == [1, 1, 0, 0]
    # Another client still has its own; a cached answer costs nothing.
    req = v.http({"x-user-id": "bot-id", "x-auth-token": "bot-token"}, source="10.8.8.8:1")
    assert req.request_headers() == PAUSE
    (callout,) = v.pending_callouts()
    v.respond(callout.token, 200, me_answer("bot-id", ["bot"]))
    other = Vm(FILTER_WASM, v.process)  # another worker: the answer is in shared data
    assert other.start(config)
    for worker, source in ((v, "10.8.8.8:2"), (v, "10.7.7.7:2"), (other, "10.7.7.7:3")):
        req = worker.http({"x-user-id": "bot-id", "x-auth-token": "bot-token"}, source=source)
        assert req.request_headers() == CONTINUE and worker.pending_callouts() == []
        req.response_headers()
        assert ratelimit_headers(req) == {}  # bypassed
    v.tick()
    other.tick()
    assert v.stat("rocketchat_ratelimit.lookups_refused") == 2
    assert v.stat("rocketchat_ratelimit.bypassed") == 4  # the first one too, once answered
