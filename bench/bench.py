#!/usr/bin/env python3
"""`make bench`: what the filter costs, side by side with Envoy's own limiter and an empty Wasm
filter (issue 5).

One run, interleaved rounds (a b c d e, a b c d e, ...) after a warm-up, so that slow drift of
the machine (other jobs, thermal, page cache) hits every configuration alike. Envoy runs at
--concurrency 1 pinned to one core (every Envoy of the run on that core, idle but for the one
under load); wrk runs pinned to the other core with 16 keep-alive connections.

  a  no extra filter (direct_response; the same route in every configuration)
  b  envoy.filters.http.local_ratelimit, x-ratelimit headers (DRAFT_VERSION_03), a bucket that
     never empties
  c  an empty proxy-wasm filter (bench/empty-filter): the floor any Wasm filter pays on V8
  d  this filter, default configuration with a limit nobody reaches; 1,000 client addresses x
     20 routes (bench/load.lua, X-Forwarded-For trusted with xff_num_trusted_hops 1 in every
     configuration)
  e  this filter with a `bypass` block, and traffic authenticated as a user who does NOT
     bypass (alice: roles ["user"]): every request still looks up the user's cached answer
     and is then counted, the most expensive path a cached request can take

Per configuration and round: req/s and latency p50/p99 (wrk), Envoy CPU µs per request
(utime+stime of /proc/<pid>/stat over the round / requests), Envoy RSS. Then the CAS retry
rate of (d) at --concurrency 2 under the same load. Prints a table of medians, the per-round
paired ratios and PASS/FAIL per target; writes everything to JSON. It is a report: a missed
target does not make it fail (exit 1 only when the harness itself breaks: errors, non-2xx).
"""

import argparse
import datetime
import http.client
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import conftest  # noqa: E402  (the test harness: envoy_config, wasm_filter, Envoy, Upstream)

LOAD_LUA = ROOT / "bench" / "load.lua"
EMPTY_WASM = Path(os.environ.get(
    "BENCH_EMPTY_WASM",
    ROOT / "target" / "bench" / "bench_empty_filter.wasm"))
CLK_TCK = os.sysconf("SC_CLK_TCK")

# A limit nobody reaches: each of the 20,000 (address, route) buckets sees a few hundred
# requests a minute.
HIGH_LIMIT = {"numRequestsAllowed": 1_000_000_000, "intervalTimeInMS": 60_000}
USER = ("alice-id", "alice-token")  # a non-bypass user of the demo upstream

TARGETS = {
    "d_over_c_rps_min": 0.95,
    "cpu_d_minus_c_us_max": 5.0,
    "e_over_d_rps_min": 0.95,
    "wasm_bytes_max": 250_000,
}

CONFIGS = {
    "a": "no extra filter",
    "b": "envoy local_ratelimit",
    "c": "empty proxy-wasm filter",
    "d": "this filter",
    "e": "this filter + bypass (cached)",
    "f": "(d) from --compare-wasm",
}


def local_ratelimit_filter():
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "bench_local_ratelimit",
            "token_bucket": {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000,
                             "fill_interval": "1s"},
            "filter_enabled": dict(always, runtime_key="bench_local_ratelimit_enabled"),
            "filter_enforced": dict(always, runtime_key="bench_local_ratelimit_enforced"),
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        },
    }


def filter_config(bypass):
    cfg = {"default": HIGH_LIMIT}
    if bypass:
        cfg["bypass"] = {
            "cluster": "rocketchat",
            "authority": "rocketchat",
            "service_user_id": "service-id",
            "service_auth_token": "service-token",
            # Longer than the run: every measured request finds its answer cached. (With the
            # default 60 s, one /me lookup per user a minute is added: ~1 in 10^6 requests.)
            "cache_ttl_ms": 600_000,
        }
    return cfg


def http_filters(name, filter_wasm, compare_wasm=None):
    if name == "f":
        # A/B of two builds of the filter, interleaved in one run: same configuration as (d).
        return [conftest.wasm_filter(filter_config(bypass=False), wasm_path=str(compare_wasm))]
    if name == "a":
        return []
    if name == "b":
        return [local_ratelimit_filter()]
    if name == "c":
        return [conftest.wasm_filter("", wasm_path=str(EMPTY_WASM), name="bench_empty")]
    return [conftest.wasm_filter(filter_config(bypass=name == "e"), wasm_path=str(filter_wasm))]


class BenchEnvoy(conftest.Envoy):
    """The test harness's Envoy, pinned to `cpus` and logging only warnings."""

    def __init__(self, *args, cpus=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cpus = cpus

    def command(self):
        cmd = [conftest.ENVOY_BIN, "-c", str(self.config_path), "--concurrency", str(self.concurrency),
               "--base-id", str(self.port), "--log-level", "warn", "--drain-time-s", "1"]
        return (["taskset", "-c", self.cpus] if self.cpus else []) + cmd

    def cpu_ticks(self):
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def wrk(port, seconds, connections, cpus, user=None, timeout_extra=30, hot=False):
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s",
           "-s", str(LOAD_LUA), f"http://127.0.0.1:{port}"]
    if user:
        cmd += ["--", *user]
    if cpus:
        cmd = ["taskset", "-c", cpus] + cmd
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, BENCH_HOT="1" if hot else "0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=seconds + timeout_extra)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {err.strip()[-500:]}")
    m = re.search(r"^BENCH_JSON (\{.*\})$", out, re.M)
    if not m:
        raise RuntimeError(f"no summary from wrk:\n{out[-1000:]}\n{err[-500:]}")
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads(m.group(1))
    summary["cpu_s"] = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    return summary


def measure(envoy, seconds, connections, load_cpus, user, hot=False):
    ticks0 = envoy.cpu_ticks()
    w = wrk(envoy.port, seconds, connections, load_cpus, user, hot=hot)
    ticks1 = envoy.cpu_ticks()
    reqs = w["requests"]
    cpu_s = (ticks1 - ticks0) / CLK_TCK
    return {
        "requests": reqs,
        "rps": reqs / (w["duration_us"] / 1e6),
        "p50_us": w["latency_us"]["p50"],
        "p99_us": w["latency_us"]["p99"],
        "cpu_us_per_req": cpu_s * 1e6 / reqs if reqs else None,
        "envoy_cpu_share": cpu_s / (w["duration_us"] / 1e6),
        "rss_mb": envoy.rss_kb() / 1024,
        # Near 1.0 would mean the load generator, not Envoy, sets the pace.
        "wrk_cpu_share": w["cpu_s"] / (w["duration_us"] / 1e6),
        "errors": w["errors"],
    }


def sanity(envoy, name, user):
    """One request by hand: 200, and x-ratelimit-* exactly where a limiter runs."""
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    headers = {"X-Forwarded-For": "10.9.9.9"}
    if user:
        headers.update({"X-User-Id": user[0], "X-Auth-Token": user[1]})
    conn.request("GET", "/api/v1/users.info", headers=headers)
    r = conn.getresponse()
    r.read()
    conn.close()
    limit = r.getheader("x-ratelimit-limit")
    want_limit = {"a": None, "c": None, "b": "1000000000", "d": "1000000000", "e": "1000000000",
                  "f": "1000000000"}[name]
    ok = r.status == 200 and limit == want_limit
    return {"status": r.status, "x-ratelimit-limit": limit, "ok": ok}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def git_describe():
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "Cargo.toml"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty-src" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def envoy_version():
    out = subprocess.run([conftest.ENVOY_BIN, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return m.group(1) if m else out.strip()


def stat_delta(before, after, names):
    return {n: after.get(f"wasmcustom.rocketchat_ratelimit.{n}", 0)
            - before.get(f"wasmcustom.rocketchat_ratelimit.{n}", 0) for n in names}


def cas_phase(args, workdir, upstream, filter_wasm):
    """(d) at --concurrency 2 (Envoy on every core), same load: how often a CAS is retried."""
    e = BenchEnvoy(workdir, upstream_port=upstream.port, concurrency=2, xff_trusted_hops=1,
                   direct_response=True, http_filters=http_filters("d", filter_wasm),
                   cpus=f"0-{(os.cpu_count() or 1) - 1}")
    e.start()
    out = {}
    names = ["allowed", "cas_retries", "store_errors", "limited", "table_collisions"]
    try:
        wrk(e.port, max(1, int(args.warmup)), args.connections, args.load_cpu, None)
        # The benchmark's load, then the worst case: every request on one counter.
        for label, hot in (("spread", False), ("one_bucket", True)):
            e.wait_for_metrics()  # the filter's counts reach Envoy on its tick
            before = e.stats()
            m = measure(e, args.cas_seconds, args.connections, args.load_cpu, None, hot=hot)
            e.wait_for_metrics()
            after = e.stats()
            d = stat_delta(before, after, names)
            out[label] = {"rps": m["rps"], "errors": m["errors"], **d,
                          "cas_retry_rate": d["cas_retries"] / d["allowed"] if d["allowed"] else None}
    finally:
        e.stop()
    return {"concurrency": 2, "seconds": args.cas_seconds, **out["spread"], "one_bucket": out["one_bucket"]}


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=int, default=5, help="length of one measured run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of load per config before round 1")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--cas-seconds", type=int, default=5, help="0: skip the --concurrency 2 run")
    p.add_argument("--configs", default="abcde")
    p.add_argument("--out", default=str(ROOT / "target" / "bench" / "results.json"))
    p.add_argument("--filter-wasm", default=conftest.FILTER_WASM)
    p.add_argument("--compare-wasm", help="another build of the filter, run as config (f), e.g."
                   " --configs cdf --compare-wasm old.wasm: reports f/d and f-d")
    p.add_argument("--envoy-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    args = p.parse_args()

    filter_wasm = Path(args.filter_wasm)
    if ("f" in args.configs) != bool(args.compare_wasm):
        sys.exit("config (f) and --compare-wasm go together")
    if args.compare_wasm and not Path(args.compare_wasm).exists():
        sys.exit(f"missing {args.compare_wasm}")
    for f, how in ((filter_wasm, "make build"), (EMPTY_WASM, "make bench-empty-filter")):
        if not f.exists():
            sys.exit(f"missing {f}: run `{how}` (make bench does)")
    if not shutil.which("wrk"):
        sys.exit("wrk not found: run `make wrk` (make bench does)")
    if (os.cpu_count() or 1) < 2:
        print("warning: one CPU only: Envoy and wrk share it", file=sys.stderr)
        args.envoy_cpu = args.load_cpu = "0"
    # The driver (and the demo upstream it starts) stay off Envoy's core.
    os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})

    out_path = Path(args.out)
    workdir = out_path.parent / "envoy"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    started = time.time()
    commit = git_describe()  # before the run: what `make build` built
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    upstream = conftest.Upstream()
    envoys = {}
    results = {"rounds": [], "sanity": {}}
    failures = []
    try:
        for name in args.configs:
            e = BenchEnvoy(workdir, upstream_port=upstream.port, concurrency=1, xff_trusted_hops=1,
                           direct_response=True,
                           http_filters=http_filters(name, filter_wasm, args.compare_wasm),
                           cpus=args.envoy_cpu)
            envoys[name] = e.start()
        users = {n: (USER if n == "e" else None) for n in args.configs}
        for name, e in envoys.items():
            results["sanity"][name] = s = sanity(e, name, users[name])
            if not s["ok"]:
                failures.append(f"sanity check of ({name}) failed: {s}")
        if args.warmup > 0:
            for name, e in envoys.items():
                wrk(e.port, args.warmup, args.connections, args.load_cpu, users[name])
        upstream_before = upstream.stats()
        for r in range(args.rounds):
            row = {}
            for name, e in envoys.items():
                row[name] = m = measure(e, args.seconds, args.connections, args.load_cpu, users[name])
                bad = {k: v for k, v in m["errors"].items() if v}
                if bad:
                    failures.append(f"round {r + 1} ({name}): wrk errors {bad}")
            results["rounds"].append(row)
            print(f"round {r + 1}/{args.rounds}: "
                  + "  ".join(f"{n} {row[n]['rps']:8.0f}/s {fmt(row[n]['cpu_us_per_req'], '5.1f')}µs"
                              for n in row), flush=True)
        upstream_after = upstream.stats()
        conftest.Envoy.wait_for_metrics()
        if "d" in envoys:
            s = envoys["d"].stats()
            results["d_metrics_concurrency_1"] = {
                k.rsplit(".", 1)[1]: v for k, v in s.items() if k.startswith("wasmcustom.rocketchat_ratelimit.")}
        if "e" in envoys:
            s = envoys["e"].stats()
            results["e_metrics"] = {
                k.rsplit(".", 1)[1]: v for k, v in s.items() if k.startswith("wasmcustom.rocketchat_ratelimit.")}
            results["e_upstream_me_calls_during_rounds"] = (
                sum(upstream_after["me_calls"].values()) - sum(upstream_before["me_calls"].values()))
    finally:
        for e in envoys.values():
            e.stop()

    try:
        if args.cas_seconds > 0 and "d" in args.configs:
            results["cas"] = cas_phase(args, workdir, upstream, filter_wasm)
            if any(results["cas"]["errors"].values()):
                failures.append(f"cas run: wrk errors {results['cas']['errors']}")
    finally:
        upstream.stop()

    rounds = results["rounds"]
    summary = {}
    for name in args.configs:
        summary[name] = {k: median([r[name][k] for r in rounds])
                         for k in ("rps", "p50_us", "p99_us", "cpu_us_per_req", "rss_mb", "envoy_cpu_share",
                                   "wrk_cpu_share")}
    paired = {}

    def pair(key, num, den, field, op):
        if num in args.configs and den in args.configs:
            paired[key] = [op(r[num][field], r[den][field]) for r in rounds]

    pair("d/c rps", "d", "c", "rps", lambda x, y: x / y)
    pair("d/b rps", "d", "b", "rps", lambda x, y: x / y)
    pair("e/d rps", "e", "d", "rps", lambda x, y: x / y)
    pair("c/a rps", "c", "a", "rps", lambda x, y: x / y)
    pair("d-c cpu us", "d", "c", "cpu_us_per_req", lambda x, y: x - y)
    pair("d-b cpu us", "d", "b", "cpu_us_per_req", lambda x, y: x - y)
    pair("e-d cpu us", "e", "d", "cpu_us_per_req", lambda x, y: x - y)
    pair("c-a cpu us", "c", "a", "cpu_us_per_req", lambda x, y: x - y)
    pair("f/d rps", "f", "d", "rps", lambda x, y: x / y)
    pair("f-d cpu us", "f", "d", "cpu_us_per_req", lambda x, y: x - y)
    ratio_medians = {k: median(v) for k, v in paired.items()}

    wasm_bytes = filter_wasm.stat().st_size
    checks = []

    def check(label, value, ok):
        checks.append({"target": label, "value": value, "pass": None if value is None else ok(value)})

    check(f"(d)/(c) req/s >= {TARGETS['d_over_c_rps_min']}", ratio_medians.get("d/c rps"),
          lambda v: v >= TARGETS["d_over_c_rps_min"])
    check(f"CPU (d)-(c) <= {TARGETS['cpu_d_minus_c_us_max']} us/request", ratio_medians.get("d-c cpu us"),
          lambda v: v <= TARGETS["cpu_d_minus_c_us_max"])
    check(f"(e)/(d) req/s >= {TARGETS['e_over_d_rps_min']}", ratio_medians.get("e/d rps"),
          lambda v: v >= TARGETS["e_over_d_rps_min"])
    check(f"release .wasm <= {TARGETS['wasm_bytes_max']} bytes", wasm_bytes,
          lambda v: v <= TARGETS["wasm_bytes_max"])

    results.update({
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "envoy": envoy_version(),
        "machine": {"cpus": os.cpu_count(), "envoy_cpu": args.envoy_cpu, "load_cpu": args.load_cpu,
                    "loadavg_before": load_before,
                    "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]},
        "params": {"rounds": args.rounds, "seconds": args.seconds, "warmup": args.warmup,
                   "connections": args.connections, "concurrency": 1, "configs": args.configs,
                   "clients": 1000, "routes": 20, "user_e": USER[0]},
        "configs": {n: CONFIGS[n] for n in args.configs},
        "wasm_bytes": {"filter": wasm_bytes, "empty_filter": EMPTY_WASM.stat().st_size},
        "median": summary,
        "paired": paired,
        "paired_median": ratio_medians,
        "checks": checks,
        "harness_failures": failures,
        "elapsed_s": round(time.time() - started, 1),
    })
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1) + "\n")

    print()
    print(f"Envoy {results['envoy']} --concurrency 1 on CPU {args.envoy_cpu}, wrk -t1 -c{args.connections} on CPU "
          f"{args.load_cpu}; {args.rounds} interleaved rounds of {args.seconds} s; medians; commit {results['commit']}")
    print(f"{'config':34} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'CPU µs/req':>11} {'RSS MB':>7}"
          f" {'Envoy CPU':>9} {'wrk CPU':>8}")
    for n in args.configs:
        s = summary[n]
        print(f"({n}) {CONFIGS[n]:30} {fmt(s['rps'], '9.0f')} {fmt(s['p50_us'], '8.0f')} {fmt(s['p99_us'], '8.0f')} "
              f"{fmt(s['cpu_us_per_req'], '11.2f')} {fmt(s['rss_mb'], '7.1f')}"
              f" {fmt(s['envoy_cpu_share'], '9.0%')} {fmt(s['wrk_cpu_share'], '8.0%')}")
    print()
    for k, v in paired.items():
        spec = ".3f" if "rps" in k else "+.2f"
        print(f"{k:11} median {fmt(ratio_medians[k], spec):>7}   rounds: " + " ".join(format(x, spec) for x in v))
    if "cas" in results:
        c = results["cas"]
        rate = c["cas_retry_rate"]
        print(f"\n(d) at --concurrency 2: {c['rps']:.0f} req/s, allowed {c['allowed']}, cas_retries {c['cas_retries']}"
              f" -> retry rate {fmt(rate, '.2e')} per allowed request; store_errors {c['store_errors']}")
        h = c["one_bucket"]
        print(f"  worst case, one address and one route: {h['rps']:.0f} req/s, allowed {h['allowed']}, cas_retries"
              f" {h['cas_retries']} -> {fmt(h['cas_retry_rate'], '.2e')}; store_errors {h['store_errors']}")
    if "e_upstream_me_calls_during_rounds" in results:
        print(f"(e): /api/v1/me callouts during the measured rounds: {results['e_upstream_me_calls_during_rounds']};"
              f" bypassed {results['e_metrics'].get('bypassed')}, allowed {results['e_metrics'].get('allowed')}")
    print()
    for c in checks:
        verdict = "n/a " if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        v = c["value"]
        shown = "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
        print(f"{verdict}  {c['target']:40} {shown}")
    print(f"\nwritten: {out_path}")
    for f in failures:
        print(f"HARNESS: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
