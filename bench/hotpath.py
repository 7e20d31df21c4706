#!/usr/bin/env python3
"""`make bench-profile`: where the filter's time goes (issue 5), in three views.

1. Boundary crossings and wasm instructions per request, counted exactly by bench/hostcalls.py
   (the filter on a minimal proxy-wasm host on wasmtime, same traffic as the benchmark) for
   (c) the empty filter, (d) this filter and (e) this filter with bypass, user answers cached.
2. Calibration in a real Envoy: the probe filter (bench/probe-filter) makes a fixed list of host
   calls per request and nothing else; interleaved rounds against the probe with an empty list
   give the Envoy CPU per call of each kind, and the "skeleton" list (exactly the host calls of
   (d), no computation) tells host calls apart from the filter's own code.
3. `perf record -e cpu-clock` of Envoy under (c) and (d): CPU µs per request by object (the
   Envoy binary — host functions, V8 runtime, HTTP —, V8's JIT code — the wasm itself —, the
   kernel, libc). The Envoy binary ships stripped, so this view stops at the object.

Writes target/bench/profile.json and prints a summary.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
import conftest  # noqa: E402  (bench put tests/ on the path)
import hostcalls  # noqa: E402

ROOT = bench.ROOT
PROBE_WASM = bench.PROBE_WASM

D_HOST_CALLS = "hdr=:method hdr=:path prop=source.address time cas metric rsp*3"
E_HOST_CALLS = "hdr=:method hdr=:path hdr=x-user-id hdr=x-auth-token prop=source.address time sget cas metric rsp*3"
# The fewest host calls an exact shared-counter limiter with x-ratelimit-* headers can make
# through this ABI: every request header in one call, the client address, the time, one read
# and one CAS write, three response headers.
FLOOR_HOST_CALLS = "rawpairs prop=source.address time cas rsp*3"
# Less than any exact shared counter can do with: no request header read, no response header,
# just who (the address), when (the time) and the count (one read, one CAS write).
CORE_HOST_CALLS = "prop=source.address time cas"
# (name, probe plan, how many calls of the kind measured)
PROBES = [
    ("empty", "", 0),
    ("get_header x16", "hdr=:path*16", 16),
    ("get_header_map_pairs x4, SDK-parsed", "pairs*4", 4),
    ("get_header_map_pairs x4, not parsed", "rawpairs*4", 4),
    ("get_property(source.address) x16", "prop=source.address*16", 16),
    ("get_current_time x16", "time*16", 16),
    ("shared get (160 B) x16", "sget*16", 16),
    ("shared get+CAS set (160 B) x8", "cas*8", 8),
    ("increment_metric x16", "metric*16", 16),
    ("replace response header x12", "rsp*12", 12),
    ("skeleton of (d): " + D_HOST_CALLS, D_HOST_CALLS, 1),
    ("skeleton of (e): " + E_HOST_CALLS, E_HOST_CALLS, 1),
    ("floor: " + FLOOR_HOST_CALLS, FLOOR_HOST_CALLS, 1),
    ("core, no headers at all: " + CORE_HOST_CALLS, CORE_HOST_CALLS, 1),
    ("(d) itself, for comparison with its skeleton", None, 1),
]


def count_calls():
    d_cfg = json.dumps(bench.filter_config(bypass=False))
    e_cfg = json.dumps(bench.filter_config(bypass=True))
    out = {}
    for name, wasm, cfg, user in (("c", bench.EMPTY_WASM, "", None),
                                  ("d", conftest.FILTER_WASM, d_cfg, None),
                                  ("e", conftest.FILTER_WASM, e_cfg, bench.USER),
                                  ("probe skeleton", PROBE_WASM, D_HOST_CALLS, None)):
        out[name] = hostcalls.profile(str(wasm), cfg, user, requests=3000, warmup=20000)
    return out


def calibrate(args, upstream, workdir):
    probes = [p for i, p in enumerate(PROBES) if not args.probes or i == 0 or str(i) in args.probes.split(",")]
    envoys = {}
    rounds = []
    try:
        for name, plan, _ in probes:
            if plan is None:
                filters = bench.http_filters("d", Path(conftest.FILTER_WASM))
            else:
                filters = [conftest.wasm_filter(plan, wasm_path=str(PROBE_WASM), name="bench_probe")]
            envoys[name] = bench.BenchEnvoy(workdir, upstream_port=upstream.port, concurrency=1,
                                            xff_trusted_hops=1, direct_response=True, http_filters=filters,
                                            cpus=args.envoy_cpu).start()
        for name, e in envoys.items():
            bench.wrk(e.port, args.warmup, 16, args.load_cpu)
        for r in range(args.rounds):
            row = {name: bench.measure(e, args.seconds, 16, args.load_cpu, None) for name, e in envoys.items()}
            rounds.append(row)
            print(f"calibration round {r + 1}/{args.rounds}", flush=True)
    finally:
        for e in envoys.values():
            e.stop()
    result = {}
    for name, plan, n in probes:
        diffs = [row[name]["cpu_us_per_req"] - row["empty"]["cpu_us_per_req"] for row in rounds]
        med = statistics.median(diffs)
        result[name] = {"plan": plan, "calls": n, "cpu_us_per_req_median": statistics.median(
            [row[name]["cpu_us_per_req"] for row in rounds]), "above_empty_us": med,
            "per_call_us": med / n if n else None, "rounds_above_empty": diffs}
    return result


def perf_split(args, upstream, workdir):
    if not shutil.which("perf"):
        return {"skipped": "perf not installed (apt-get install linux-perf)"}
    out = {}
    for name in ("c", "d"):
        e = bench.BenchEnvoy(workdir, upstream_port=upstream.port, concurrency=1, xff_trusted_hops=1,
                             direct_response=True, http_filters=bench.http_filters(name, Path(conftest.FILTER_WASM)),
                             cpus=args.envoy_cpu).start()
        try:
            bench.wrk(e.port, args.warmup, 16, args.load_cpu)
            data = workdir / f"perf-{name}.data"
            rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-p", str(e.pid()),
                                    "-o", str(data), "--", "sleep", str(args.seconds)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            m = bench.measure(e, args.seconds + 1, 16, args.load_cpu, None)
            rec.wait()
        finally:
            e.stop()
        rep = subprocess.run(["perf", "report", "-i", str(data), "--sort", "dso", "--stdio", "--no-children",
                              "-g", "none"], capture_output=True, text=True).stdout
        shares = {}
        for line in rep.splitlines():
            mm = re.match(r"\s+([\d.]+)%\s+(.+?)\s*$", line)
            if mm:
                dso = re.sub(r"\[JIT\] tid \d+", "[JIT] (V8: the wasm code)", mm.group(2))
                dso = {"envoy": "envoy binary (host calls, V8 runtime, HTTP)"}.get(dso, dso)
                shares[dso] = shares.get(dso, 0) + float(mm.group(1)) / 100
        out[name] = {"cpu_us_per_req": m["cpu_us_per_req"],
                     "us_per_req_by_object": {k: v * m["cpu_us_per_req"] for k, v in shares.items()}}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--envoy-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    p.add_argument("--out", default=str(ROOT / "target" / "bench" / "profile.json"))
    p.add_argument("--skip", default="", help="comma list of: calls, calibrate, perf")
    p.add_argument("--probes", default="", help="comma list of PROBES indexes to calibrate (0, the empty probe, always)")
    args = p.parse_args()
    for f in (PROBE_WASM, bench.EMPTY_WASM, Path(conftest.FILTER_WASM)):
        if not f.exists():
            sys.exit(f"missing {f}: run `make bench-profile`")
    os.sched_setaffinity(0, {int(c) for c in args.load_cpu.split(",")})
    skip = set(filter(None, args.skip.split(",")))
    out_path = Path(args.out)
    workdir = out_path.parent / "profile-envoy"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    result = {"commit": bench.git_describe()}
    if "calls" not in skip:
        result["calls"] = count_calls()
    upstream = conftest.Upstream()
    try:
        if "calibrate" not in skip:
            result["calibration"] = calibrate(args, upstream, workdir)
        if "perf" not in skip:
            result["perf"] = perf_split(args, upstream, workdir)
    finally:
        upstream.stop()
    out_path.write_text(json.dumps(result, indent=1) + "\n")

    if "calls" in result:
        print("\nPer request (exact, bench/hostcalls.py):")
        print(f"{'':16} {'crossings':>9} {'host calls':>10} {'allocs':>6} {'B in':>5} {'B out':>5} {'wasm instr':>10}")
        for name, r in result["calls"].items():
            allocs = r["host_calls_per_request"].get("<host->wasm> proxy_on_memory_allocate", 0)
            print(f"{name:16} {r['crossings_per_request']:9.2f} {r['host_calls_total_per_request']:10.2f} {allocs:6.2f}"
                  f" {r['bytes_host_to_wasm_per_request']:5.0f} {r['bytes_wasm_to_host_per_request']:5.0f}"
                  f" {r['wasm_instructions_total_per_request']:10.0f}")
        for name in ("d", "e"):
            print(f"  ({name}) " + ", ".join(f"{k} {v:g}" for k, v in result["calls"][name]["host_calls_per_request"].items()))
            print(f"  ({name}) instructions by callback: " + ", ".join(
                f"{k} {v:.0f}" for k, v in result["calls"][name]["wasm_instructions_per_request"].items()))
    if "calibration" in result:
        print(f"\nEnvoy CPU per host call (probe filter, median of {args.rounds} interleaved rounds above the empty probe):")
        for name, r in result["calibration"].items():
            per = "" if r["per_call_us"] is None or r["calls"] <= 1 else f"  = {r['per_call_us']:.2f} µs per call"
            print(f"  {name:52} {r['above_empty_us']:+7.2f} µs/request{per}")
    if "perf" in result:
        print("\nperf (cpu-clock), Envoy CPU µs per request by object:")
        for name, r in result["perf"].items():
            if isinstance(r, dict):
                print(f"  ({name}) total {r['cpu_us_per_req']:.1f}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in sorted(r["us_per_req_by_object"].items(), key=lambda kv: -kv[1])
                    if v >= 0.1))
            else:
                print(f"  {name}: {r}")
    print(f"\nwritten: {out_path}")


if __name__ == "__main__":
    main()
