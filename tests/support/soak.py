#!/usr/bin/env python3
"""Soak (issue 6): mixed traffic at a steady rate through a real Envoy for a while, with config
pushes every 30 s and bypass callouts that fail one time in ten, then checks:

- no 5xx and no failed request;
- no lost or double counts: the filter's metrics equal the client-side tallies, request by
  request (every outcome is visible to the client: 200 with x-ratelimit-* = counted and
  allowed, 429 = limited, 200 without headers on a limited route = bypass);
- Envoy's resident memory flat after warm-up (< 5 MB drift over the last half).

Run: python3 tests/support/soak.py [seconds]   (make soak: 600 s; the CI test runs 60 s)
"""

import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import Upstream  # noqa: E402
from test_config_push import LdsEnvoy  # noqa: E402

RATE = 250  # requests per second, all threads together
THREADS = 8
PUSH_EVERY_S = 30
# The first push comes during warm-up: Envoy's first listener update allocates once (~12 MB
# here) and keeps it; later pushes do not grow memory, and those are what the check watches.
FIRST_PUSH_S = 10


def plugin_config(generation):
    # Pushes alternate another route's limit; the routes the traffic counts on keep theirs.
    return {
        "default": {"numRequestsAllowed": 10, "intervalTimeInMS": 10000},
        "routes": [
            {"path": "/api/v1/chat.postMessage", "method": "POST",
             "rateLimiterOptions": {"numRequestsAllowed": 5, "intervalTimeInMS": 5000}},
            {"path": "/api/v1/never.used", "rateLimiterOptions": {"numRequestsAllowed": 1 + generation % 2}},
        ],
        "bypass": {"cluster": "rocketchat", "authority": "rocketchat",
                   "service_user_id": "service-id", "service_auth_token": "service-token",
                   "timeout_ms": 300, "cache_ttl_ms": 2000, "refresh_interval_ms": 5000},
    }


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"allowed": 0, "limited": 0, "bypassed": 0, "not_limited": 0,
                       "failed": 0, "5xx": 0, "requests": 0}
        self.failures = []

    def add(self, key, detail=None):
        with self.lock:
            self.counts[key] += 1
            self.counts["requests"] += 1
            if detail is not None and len(self.failures) < 10:
                self.failures.append(detail)


def one_request(envoy, rng, tally):
    ip = f"10.20.{rng.randrange(4)}.{rng.randrange(50)}"
    kind = rng.random()
    headers = {}
    if kind < 0.15:
        method, path, limited = "GET", "/api/info", False
    elif kind < 0.20:
        method, path, limited = "POST", "/api/v1/method.call/login", False
    elif kind < 0.45:
        method, path, limited = "POST", "/api/v1/chat.postMessage", True
    else:
        method, path, limited = "GET", f"/api/v1/route{rng.randrange(20)}.list", True
    if limited and rng.random() < 0.3:
        if rng.random() < 0.1:
            # A token nobody cached: a real callout (which fails one time in ten upstream).
            headers = {"X-User-Id": "bot-id", "X-Auth-Token": f"t{rng.getrandbits(48)}"}
        else:
            headers = {"X-User-Id": "bot-id", "X-Auth-Token": "bot-token"}
    try:
        r = envoy.request(method, path, headers, xff=ip)
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        tally.add("failed", repr(e))
        return
    has_headers = "x-ratelimit-limit" in r.headers
    if r.status >= 500:
        tally.add("5xx", r)
    elif not limited:
        tally.add("not_limited" if not has_headers else "failed", None if not has_headers else r)
    elif r.status == 429:
        tally.add("limited")
    elif r.status == 200 and has_headers:
        tally.add("allowed")
    elif r.status == 200:
        tally.add("bypassed")
    else:
        tally.add("failed", r)


def soak(seconds, tmp_dir):
    upstream = Upstream()
    upstream.control(fault="flaky")
    lds = LdsEnvoy(Path(tmp_dir), upstream.port, plugin_config(0))
    envoy = lds.envoy
    envoy.concurrency = 2
    envoy.start()
    tally = Tally()
    stop = threading.Event()
    rss = []

    def worker(k):
        rng = random.Random(k)
        interval = THREADS / RATE
        next_at = time.time()
        while not stop.is_set():
            one_request(envoy, rng, tally)
            next_at += interval
            delay = next_at - time.time()
            if delay > 0:
                time.sleep(delay)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    started = time.time()
    try:
        for t in threads:
            t.start()
        generation = 0
        next_push = started + FIRST_PUSH_S
        while time.time() - started < seconds:
            time.sleep(1)
            rss.append((time.time() - started, envoy.rss_kb()))
            if time.time() >= next_push:
                generation += 1
                lds.push(plugin_config(generation))
                next_push += PUSH_EVERY_S
        stop.set()
        for t in threads:
            t.join()
        time.sleep(0.5)
        metrics = {m: envoy.metric(m) for m in
                   ("allowed", "limited", "bypassed", "not_limited", "callout_failures", "store_errors",
                    "dry_run_limited")}
        pushes = generation
    finally:
        stop.set()
        envoy.stop()
        upstream.stop()

    half = [kb for t, kb in rss if t >= seconds / 2]
    drift_kb = max(half) - min(half) if half else 0
    report = {"seconds": seconds, "pushes": pushes, "client": tally.counts, "filter": metrics,
              "rss_kb_first_last": (rss[0][1], rss[-1][1]) if rss else None,
              "rss_drift_last_half_kb": drift_kb,
              "rss_kb_every_10s": [kb for t, kb in rss][::10], "failures": [repr(f) for f in tally.failures]}
    problems = []
    if tally.counts["5xx"] or tally.counts["failed"]:
        problems.append("failed requests or 5xx")
    for key in ("allowed", "limited", "not_limited"):
        if tally.counts[key] != metrics[key]:
            problems.append(f"{key}: client saw {tally.counts[key]}, filter counted {metrics[key]}")
    if tally.counts["bypassed"] != metrics["bypassed"] + metrics["store_errors"]:
        problems.append(f"bypassed: client saw {tally.counts['bypassed']}, filter counted {metrics['bypassed']}")
    if metrics["callout_failures"] == 0:
        problems.append("no callout failed: the fault injection did not work")
    if drift_kb >= 5 * 1024:
        problems.append(f"RSS drifted {drift_kb} kB over the last half")
    return report, problems


def main():
    import json
    import tempfile
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 600
    with tempfile.TemporaryDirectory() as tmp:
        report, problems = soak(seconds, tmp)
    print(json.dumps(report, indent=1))
    if problems:
        print("SOAK FAILED:\n- " + "\n- ".join(problems))
        return 1
    print("soak ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
