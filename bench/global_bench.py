#!/usr/bin/env python3
"""`make bench`, the `global` part (issue 10, SPEC §10): what asking the Rate Limit Service
costs an admitted request, and what the local over-limit verdicts save in a flood.

Interleaved rounds (L G F N, L G F N, ...) after a warm-up. Envoy at --concurrency 1 pinned to
CPU 0; wrk, the reference engine (tools/ratelimit-engine) and redis-server on CPU 1, all on
loopback.

  L  this filter, local mode: the benchmark's load (1,000 clients x 20 routes, bench/load.lua),
     a limit nobody reaches, wrk with 4 connections (a latency measurement, not saturation)
  G  the same with `global` on: every request asks the engine (one gRPC call, Redis INCRBY)
  F  a flood in global mode: one client, one route, limit 1, 16 connections: every request
     after the first gets the 429, from the local over-limit verdict
  N  the same flood with a build that has no local verdicts (cargo feature
     bench-no-verdict-cache): every 429 is the engine's answer

Targets: p99 latency (G) - (L) <= 1 ms (median of the paired rounds); the flood's 429
throughput (F) / (N) is reported. A report: a missed target does not fail it (exit 1 only when
the harness breaks, or when a global configuration fell back to local counting).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import conftest  # noqa: E402
from bench import BenchEnvoy, git_describe, measure, wrk  # noqa: E402
from global_stack import Engine, Redis, global_envoy_config  # noqa: E402

HIGH = {"numRequestsAllowed": 1_000_000_000, "intervalTimeInMS": 60_000}
FLOOD = {"numRequestsAllowed": 1, "intervalTimeInMS": 86_400_000}
NO_CACHE_WASM = Path(os.environ.get(
    "BENCH_NO_VERDICT_CACHE_WASM",
    ROOT / "target/bench/no-verdict-cache/wasm32-wasip1/release/rocketchat_ratelimit_wasm.wasm"))
TARGET_P99_ADDED_US = 1000

CONFIGS = {
    "L": "local mode, admitted",
    "G": "global mode, admitted",
    "F": "global flood, local verdicts",
    "N": "global flood, no local verdicts",
}


def plugin(name):
    cfg = {"default": FLOOD if name in "FN" else HIGH}
    if name != "L":
        cfg["global"] = {"cluster": "ratelimit", "domain": "rocketchat", "timeout_ms": 100}
    return cfg


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "target" / "bench" / "global.json"))
    p.add_argument("--envoy-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    args = p.parse_args()
    for f in (Path(conftest.FILTER_WASM), NO_CACHE_WASM):
        if not f.exists():
            sys.exit(f"missing {f}: run `make bench` (it builds both)")
    os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})

    out_path = Path(args.out)
    workdir = out_path.parent / "envoy-global"
    workdir.mkdir(parents=True, exist_ok=True)
    started, commit = time.time(), git_describe()
    upstream = conftest.Upstream()
    redis = Redis(workdir).start()
    engine = Engine(workdir, redis.port).start()
    envoys, rounds, failures = {}, [], []
    connections = {"L": 4, "G": 4, "F": 16, "N": 16}
    try:
        for name in CONFIGS:
            wasm = NO_CACHE_WASM if name == "N" else conftest.FILTER_WASM
            port, admin = conftest.free_port(), conftest.free_port()
            cfg = global_envoy_config(port, admin, upstream.port, engine.port, plugin(name))
            cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
                "http_filters"][0] = conftest.wasm_filter(plugin(name), wasm_path=str(wasm))
            # The same direct response in every configuration: the upstream is not measured.
            hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            hcm["route_config"]["virtual_hosts"][0]["routes"] = [{
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": "{\"success\":true}"}}}]
            e = BenchEnvoy(workdir, config=cfg, concurrency=1, cpus=args.envoy_cpu)
            e.port, e.admin_port = port, admin
            e.config_path.write_text(json.dumps(cfg))
            envoys[name] = e.start()
        for name, e in envoys.items():
            wrk(e.port, args.warmup, connections[name], args.load_cpu, None, hot=name in "FN")
        conftest.Envoy.wait_for_metrics()
        before = {n: e.stats() for n, e in envoys.items()}
        for r in range(args.rounds):
            row = {}
            for name, e in envoys.items():
                row[name] = m = measure(e, args.seconds, connections[name], args.load_cpu, None,
                                        hot=name in "FN")
                if m["errors"].get("connect") or m["errors"].get("read") or m["errors"].get("timeout"):
                    failures.append(f"round {r + 1} ({name}): wrk errors {m['errors']}")
            rounds.append(row)
            print(f"round {r + 1}/{args.rounds}: " + "  ".join(
                f"{n} {row[n]['rps']:7.0f}/s p99 {row[n]['p99_us']:6.0f}µs" for n in row), flush=True)
        conftest.Envoy.wait_for_metrics()
        metrics = {}
        for name, e in envoys.items():
            after = e.stats()
            metrics[name] = {k.rsplit(".", 1)[1]: after[k] - before[name].get(k, 0)
                             for k in after if k.startswith("wasmcustom.rocketchat_ratelimit.")}
            if name != "L" and metrics[name].get("global_failures"):
                failures.append(f"({name}) fell back to local counting {metrics[name]['global_failures']} times")
    finally:
        for e in envoys.values():
            e.stop()
        engine.stop()
        redis.stop()
        upstream.stop()

    med = {n: {k: statistics.median(r[n][k] for r in rounds)
               for k in ("rps", "p50_us", "p99_us", "cpu_us_per_req")} for n in CONFIGS}
    p99_added = [r["G"]["p99_us"] - r["L"]["p99_us"] for r in rounds]
    p50_added = [r["G"]["p50_us"] - r["L"]["p50_us"] for r in rounds]
    flood_ratio = [r["F"]["rps"] / r["N"]["rps"] for r in rounds]
    results = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "params": {"rounds": args.rounds, "seconds": args.seconds, "connections": connections},
        "configs": CONFIGS,
        "rounds": rounds,
        "median": med,
        "metrics": metrics,
        "paired": {"G-L p99 us": p99_added, "G-L p50 us": p50_added, "F/N rps": flood_ratio},
        "paired_median": {"G-L p99 us": statistics.median(p99_added),
                          "G-L p50 us": statistics.median(p50_added),
                          "F/N rps": statistics.median(flood_ratio)},
        "harness_failures": failures,
        "elapsed_s": round(time.time() - started, 1),
    }
    out_path.write_text(json.dumps(results, indent=1) + "\n")

    print(f"\nglobal mode: Envoy --concurrency 1 on CPU {args.envoy_cpu}; wrk, engine and Redis on CPU "
          f"{args.load_cpu}; {args.rounds} interleaved rounds of {args.seconds} s; medians; commit {commit}")
    print(f"{'config':40} {'req/s':>8} {'p50 µs':>8} {'p99 µs':>8} {'CPU µs/req':>11} {'engine calls':>13}")
    for n, label in CONFIGS.items():
        s = med[n]
        print(f"({n}) {label:36} {s['rps']:8.0f} {s['p50_us']:8.0f} {s['p99_us']:8.0f} "
              f"{s['cpu_us_per_req']:11.2f} {metrics.get(n, {}).get('global_calls', 0):13d}")
    pm = results["paired_median"]
    print(f"\nG-L p50 median {pm['G-L p50 us']:+.0f} µs; G-L p99 median {pm['G-L p99 us']:+.0f} µs   rounds: "
          + " ".join(f"{x:+.0f}" for x in p99_added))
    print(f"F/N req/s median {pm['F/N rps']:.2f}   rounds: " + " ".join(f"{x:.2f}" for x in flood_ratio))
    verdict = "PASS" if pm["G-L p99 us"] <= TARGET_P99_ADDED_US else "FAIL"
    print(f"\n{verdict}  p99 added by the engine call <= {TARGET_P99_ADDED_US} µs   {pm['G-L p99 us']:.0f}")
    print(f"written: {out_path}")
    for f in failures:
        print(f"HARNESS: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
