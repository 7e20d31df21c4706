#!/usr/bin/env python3
"""`make bench`: what the filter costs, side by side with Envoy's own limiter, an empty Wasm
filter and the floor of the host calls its job needs, for counted requests and for a flood
(issues 5 and 13).

One run, interleaved rounds (a b c ... i, a b c ... i, ...) after a warm-up, so that slow drift
of the machine (other jobs, thermal, page cache) hits every configuration alike. Envoy runs at
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
  f  the floor of (d): the probe filter (bench/probe-filter) making exactly the host calls a
     counted request cannot avoid, and computing nothing: :path and :method, source.address,
     the time, one shared-data get and one CAS set, three response headers
  g  the flood: this filter with limit 1 a day, (d)'s 1,000 clients x 20 routes; the warm-up
     spends every bucket's one request, so every measured response is the filter's 429
  h  envoy.filters.http.local_ratelimit with an empty bucket (one token a day, spent by the
     warm-up), x-ratelimit headers as in (b): every response its 429, the anchor for (g)
  i  the floor of a 429: the probe reading :path, source.address and the time, then sending
     a local reply with the headers and body size of the filter's 429
  x  with --compare-wasm: another build of the filter, configured as (d) (an A/B of builds)
  y  with --compare-wasm: that build configured as (g), the flood

Per configuration and round: req/s and latency p50/p99 (wrk), Envoy CPU µs per request
(utime+stime of /proc/<pid>/stat over the round / requests), Envoy RSS. Then the CAS retry
rate of (d) at --concurrency 2 under the same load. Prints a table of medians, the per-round
paired ratios and PASS/FAIL per target; writes everything to JSON and draws every round of
every configuration (req/s, CPU µs/request) into an SVG next to it. It is a report: a missed
target does not make it fail (exit 1 only when the harness itself breaks: wrk errors, a
non-2xx where a request should pass, a 2xx where every response should be a 429).
"""

import argparse
import datetime
import http.client
import json
import math
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
PROBE_WASM = Path(os.environ.get(
    "BENCH_PROBE_WASM",
    ROOT / "target" / "bench" / "probe-filter" / "wasm32-wasip1" / "release" / "bench_probe_filter.wasm"))
CLK_TCK = os.sysconf("SC_CLK_TCK")

# A limit nobody reaches: each of the 20,000 (address, route) buckets sees a few hundred
# requests a minute.
HIGH_LIMIT = {"numRequestsAllowed": 1_000_000_000, "intervalTimeInMS": 60_000}
USER = ("alice-id", "alice-token")  # a non-bypass user of the demo upstream
# (g): one request a day per bucket; every bucket of the load is spent during the warm-up.
FLOOD_LIMIT = {"numRequestsAllowed": 1, "intervalTimeInMS": 86_400_000}
# Two passes over the load's 20,000 buckets before round 1: the first spends each bucket's one
# request, the second gets each bucket's first 429 (the VM then knows it is exhausted).
FLOOD_WARMUP_REQUESTS = 2 * 20_000

# The probe filter's plans (bench/probe-filter): the host calls of (d) that no exact shared
# counter with x-ratelimit-* headers can avoid, and nothing else...
FLOOR_PASS = "hdr=:path hdr=:method prop=source.address time cas rsp*3"
# ...and those of a 429: who (the address), what (the path), when (the time), the reply.
FLOOR_429 = "hdr=:path prop=source.address time reply"

TARGETS = {
    "d_minus_c_over_f_minus_c_max": 1.1,
    "g_minus_i_cpu_us_max": 2.0,
    "g_over_h_rps_min": 0.9,
    "wasm_bytes_max": 400_000,
}

CONFIGS = {
    "a": "no extra filter",
    "b": "envoy local_ratelimit",
    "c": "empty proxy-wasm filter",
    "d": "this filter",
    "e": "this filter + bypass (cached)",
    "f": "floor probe of (d)",
    "g": "this filter, flood (all 429)",
    "h": "local_ratelimit, empty (all 429)",
    "i": "floor probe of a 429",
    "x": "(d) from --compare-wasm",
    "y": "(g) from --compare-wasm",
}
# Every response of these is a 429 (wrk counts them as "status" errors).
ALL_429 = "ghiy"
# Floods: their warm-up spends every bucket first.
FLOODS = "gy"


def local_ratelimit_filter(empty=False):
    always = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    bucket = {"max_tokens": 1_000_000_000, "tokens_per_fill": 1_000_000_000, "fill_interval": "1s"}
    if empty:  # one token a day: spent by the sanity request, then every response is a 429
        bucket = {"max_tokens": 1, "tokens_per_fill": 1, "fill_interval": "86400s"}
    return {
        "name": "envoy.filters.http.local_ratelimit",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "bench_local_ratelimit",
            "token_bucket": bucket,
            "filter_enabled": dict(always, runtime_key="bench_local_ratelimit_enabled"),
            "filter_enforced": dict(always, runtime_key="bench_local_ratelimit_enforced"),
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        },
    }


def filter_config(bypass, flood=False):
    cfg = {"default": FLOOD_LIMIT if flood else HIGH_LIMIT}
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


def probe_filter(plan):
    return conftest.wasm_filter(plan, wasm_path=str(PROBE_WASM), name="bench_probe")


def http_filters(name, filter_wasm, compare_wasm=None):
    if name in "xy":
        # A/B of two builds of the filter, interleaved in one run: configured as (d) or (g).
        return [conftest.wasm_filter(filter_config(bypass=False, flood=name == "y"), wasm_path=str(compare_wasm))]
    if name == "a":
        return []
    if name in "bh":
        return [local_ratelimit_filter(empty=name == "h")]
    if name == "c":
        return [conftest.wasm_filter("", wasm_path=str(EMPTY_WASM), name="bench_empty")]
    if name in "fi":
        return [probe_filter(FLOOR_PASS if name == "f" else FLOOR_429)]
    return [conftest.wasm_filter(filter_config(bypass=name == "e", flood=name == "g"), wasm_path=str(filter_wasm))]


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
    """Requests by hand: 200, and x-ratelimit-* exactly where a limiter runs; where every
    response is to be a 429, the second request (the first may spend the bucket) gets it."""
    headers = {"X-Forwarded-For": "10.9.9.9"}
    if user:
        headers.update({"X-User-Id": user[0], "X-Auth-Token": user[1]})
    for _ in range(2 if name in ALL_429 else 1):
        conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
        conn.request("GET", "/api/v1/users.info", headers=headers)
        r = conn.getresponse()
        body = r.read()
        conn.close()
    limit = r.getheader("x-ratelimit-limit")
    want_limit = {"a": None, "c": None, "f": None, "b": "1000000000", "d": "1000000000", "e": "1000000000",
                  "x": "1000000000", "g": "1", "h": "1", "i": "1", "y": "1"}[name]
    want_status = 429 if name in ALL_429 else 200
    ok = r.status == want_status and limit == want_limit
    return {"status": r.status, "x-ratelimit-limit": limit, "retry-after": r.getheader("retry-after"),
            "body_bytes": len(body), "ok": ok}


def flood_warmup(envoy, args):
    """(g)'s warm-up: one wrk run of at least FLOOD_WARMUP_REQUESTS (each run of bench/load.lua
    starts its fixed order of the 20,000 buckets from the first, so the two passes must be in
    one run), lengthened until it is."""
    seconds = max(args.warmup, 1)
    while True:
        n = wrk(envoy.port, seconds, args.connections, args.load_cpu, None)["requests"]
        if n >= FLOOD_WARMUP_REQUESTS:
            return
        seconds = min(120, math.ceil(seconds * FLOOD_WARMUP_REQUESTS / max(n, 1) * 1.25))


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


# --- the rounds, drawn (hand-written SVG: no plotting library in the venv for one chart) -----

ROUND_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf", "#000080", "#808000", "#ff69b4", "#00ced1", "#8b0000"]


def _esc(text):
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    span = hi - lo if hi > lo else abs(hi) or 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    last = math.ceil(hi / step) * step
    k = round((last - first) / step)
    return [first + i * step for i in range(k + 1)]


def _wrap(text, width):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def _fmt_tick(v):
    return f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:g}"


def _panel(out, x0, y0, w, h, title, columns, values, colours, lines=(), zero=True):
    """A strip chart: one column per name in `columns`, one dot per value of values[name]
    (coloured by round), a bar at the median; `lines`: (value, label) reference lines."""
    flat = [v for name in columns for v in values.get(name, []) if v is not None] + [v for v, _ in lines]
    if not flat:
        return
    lo, hi = (min(min(flat), 0) if zero else min(flat)), max(flat)
    if hi == lo:
        hi = lo + 1
    ticks = _ticks(lo, hi)
    lo, hi = ticks[0], ticks[-1]

    def y(v):
        return y0 + h - (v - lo) / (hi - lo) * h

    out.append(f'<text x="{x0}" y="{y0 - 8}" font-size="13" font-weight="bold">{_esc(title)}</text>')
    for t in ticks:
        out.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x0 - 6}" y="{y(t) + 4:.1f}" font-size="10" text-anchor="end">{_fmt_tick(t)}</text>')
    out.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>')
    for v, label in lines:
        out.append(f'<line x1="{x0}" x2="{x0 + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#c00"'
                   f' stroke-dasharray="5,3"/>')
        below = y(v) - y0 < 16  # no room above the line
        out.append(f'<text x="{x0 + w - 4}" y="{y(v) + (13 if below else -4):.1f}" font-size="10" fill="#c00"'
                   f' text-anchor="end">{_esc(label)}</text>')
    col = w / max(len(columns), 1)
    for i, name in enumerate(columns):
        cx = x0 + col * (i + 0.5)
        vs = values.get(name, [])
        spread = min(col * 0.6, 8 * len(vs))
        for k, v in enumerate(vs):
            if v is None:
                continue
            dx = 0 if len(vs) < 2 else (k / (len(vs) - 1) - 0.5) * spread
            out.append(f'<circle cx="{cx + dx:.1f}" cy="{y(v):.1f}" r="3" fill="{colours[k % len(colours)]}"'
                       f' fill-opacity="0.85"><title>{_esc(name)} round {k + 1}: {v:.2f}</title></circle>')
        med = median(vs)
        if med is not None:
            half = max(spread / 2 + 5, 10)
            out.append(f'<line x1="{cx - half:.1f}" x2="{cx + half:.1f}" y1="{y(med):.1f}" y2="{y(med):.1f}"'
                       f' stroke="#000" stroke-width="2"/>')


def draw_rounds(results):
    """Every round of every configuration (req/s, Envoy CPU µs/request), and the paired target
    figures per round, as an SVG document."""
    rounds = results["rounds"]
    names = list(results["configs"])
    colours = ROUND_COLOURS
    W, left, right = 1100, 70, 20
    pw = W - left - right
    out = []
    p = results["params"]
    m = results["machine"]
    title = (f"make bench: commit {results['commit']}, {results['when']}, Envoy {results['envoy']} --concurrency 1,"
             f" {p['rounds']} interleaved rounds of {p['seconds']} s")
    sub = (f"load average {' '.join(m['loadavg_before'])} before, {' '.join(m['loadavg_after'])} after."
           " One dot per round (colour = round, left to right in round order); black bar = median.")
    out.append(f'<text x="{left}" y="22" font-size="13">{_esc(title)}</text>')
    out.append(f'<text x="{left}" y="40" font-size="11" fill="#555">{_esc(sub)}</text>')
    y0 = 75
    for key, label in (("rps", "req/s"), ("cpu_us_per_req", "Envoy CPU µs per request")):
        vals = {n: [r[n][key] for r in rounds] for n in names}
        _panel(out, left, y0, pw, 220, label, names, vals, colours)
        col = pw / max(len(names), 1)
        for i, n in enumerate(names):
            cx = left + col * (i + 0.5)
            out.append(f'<text x="{cx:.1f}" y="{y0 + 236}" font-size="11" text-anchor="middle"'
                       f' font-weight="bold">({n})</text>')
            for k, line in enumerate(_wrap(results["configs"][n], max(8, int(col / 5.5)))):
                out.append(f'<text x="{cx:.1f}" y="{y0 + 249 + 11 * k}" font-size="9" text-anchor="middle">'
                           f'{_esc(line)}</text>')
        y0 += 310
    # The targets, per round.
    t = TARGETS
    targets = [("(d-c)/(f-c) cpu", "CPU (d)−(c) over (f)−(c)", t["d_minus_c_over_f_minus_c_max"], "≤ 1.1"),
               ("g-i cpu us", "CPU (g) − (i), µs/request", t["g_minus_i_cpu_us_max"], "≤ 2 µs"),
               ("g/h rps", "req/s (g) / (h)", t["g_over_h_rps_min"], "≥ 0.9")]
    targets = [x for x in targets if x[0] in results["paired"]]
    if targets:
        gap = 70
        w = (pw - gap * (len(targets) - 1)) / len(targets)
        for j, (key, label, limit, how) in enumerate(targets):
            x0 = left + j * (w + gap)
            lines = [(limit, f"target {how}")]
            if key == "g/h rps" and results["paired_median"].get("i/h rps") is not None:
                lines.append((results["paired_median"]["i/h rps"], "floor: (i)/(h), median"))
            _panel(out, x0, y0, w, 160, f"target: {label}", [key], {key: results["paired"][key]}, colours,
                   lines=lines, zero=key != "g-i cpu us")
        y0 += 200
    # The legend of the round colours.
    for k in range(len(rounds)):
        out.append(f'<circle cx="{left + 10 + k * 70}" cy="{y0}" r="4" fill="{colours[k % len(colours)]}"/>')
        out.append(f'<text x="{left + 18 + k * 70}" y="{y0 + 4}" font-size="11">round {k + 1}</text>')
    H = y0 + 20
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}"'
            f' font-family="sans-serif">\n<rect width="100%" height="100%" fill="#fff"/>\n'
            + "\n".join(out) + "\n</svg>\n")


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=int, default=5, help="length of one measured run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of load per config before round 1")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--cas-seconds", type=int, default=5, help="0: skip the --concurrency 2 run")
    p.add_argument("--configs", default="abcdefghi")
    p.add_argument("--out", default=str(ROOT / "target" / "bench" / "results.json"))
    p.add_argument("--filter-wasm", default=conftest.FILTER_WASM)
    p.add_argument("--compare-wasm", help="another build of the filter, run as config (x) and/or (y), e.g."
                   " --configs dxgy --compare-wasm old.wasm: reports x/d, x-d, y/g and y-g")
    p.add_argument("--svg", help="where to draw the rounds (default: bench.svg beside the default --out,"
                   " else --out with .svg)")
    p.add_argument("--envoy-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    args = p.parse_args()

    filter_wasm = Path(args.filter_wasm)
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        sys.exit(f"unknown configs {''.join(sorted(unknown))}: choose among {''.join(CONFIGS)}")
    if bool(set("xy") & set(args.configs)) != bool(args.compare_wasm):
        sys.exit("configs (x), (y) and --compare-wasm go together")
    if args.compare_wasm and not Path(args.compare_wasm).exists():
        sys.exit(f"missing {args.compare_wasm}")
    for f, how in ((filter_wasm, "make build"), (EMPTY_WASM, "make bench-empty-filter"),
                   (PROBE_WASM, "make bench-probe-filter")):
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
        if "g" in envoys and "i" in envoys and abs(
                results["sanity"]["g"]["body_bytes"] - results["sanity"]["i"]["body_bytes"]) > 1:
            failures.append("the 429s of (g) and (i) differ in body size (beyond one digit of the wait): "
                            f"{results['sanity']['g']} {results['sanity']['i']}")
        for name, e in envoys.items():
            if name in FLOODS:
                flood_warmup(e, args)
            elif args.warmup > 0:
                wrk(e.port, args.warmup, args.connections, args.load_cpu, users[name])
        upstream_before = upstream.stats()
        if "g" in envoys:
            conftest.Envoy.wait_for_metrics()
            g_before = envoys["g"].stats()
        for r in range(args.rounds):
            row = {}
            for name, e in envoys.items():
                row[name] = m = measure(e, args.seconds, args.connections, args.load_cpu, users[name])
                errors = dict(m["errors"])
                if name in ALL_429:
                    # Every response a 429: as many "status" errors (non-2xx/3xx) as requests.
                    if errors.get("status") != m["requests"]:
                        failures.append(f"round {r + 1} ({name}): {m['requests'] - errors.get('status', 0)}"
                                        f" of {m['requests']} responses were not 429s")
                    errors.pop("status", None)
                bad = {k: v for k, v in errors.items() if v}
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
        if "g" in envoys:
            # During the rounds: every request limited, none allowed.
            results["g_metrics_during_rounds"] = stat_delta(
                g_before, envoys["g"].stats(), ["allowed", "limited", "store_errors", "cas_retries"])
            if results["g_metrics_during_rounds"]["allowed"]:
                failures.append(f"(g) let requests through during the rounds: {results['g_metrics_during_rounds']}")
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
    pair("f-c cpu us", "f", "c", "cpu_us_per_req", lambda x, y: x - y)
    pair("d-f cpu us", "d", "f", "cpu_us_per_req", lambda x, y: x - y)
    if all(n in args.configs for n in "cdf"):
        # The counted request's cost over the empty filter, in units of the floor's.
        paired["(d-c)/(f-c) cpu"] = [
            (r["d"]["cpu_us_per_req"] - r["c"]["cpu_us_per_req"])
            / max(r["f"]["cpu_us_per_req"] - r["c"]["cpu_us_per_req"], 1e-9) for r in rounds]
    pair("g-i cpu us", "g", "i", "cpu_us_per_req", lambda x, y: x - y)
    pair("g/h rps", "g", "h", "rps", lambda x, y: x / y)
    pair("g-h cpu us", "g", "h", "cpu_us_per_req", lambda x, y: x - y)
    pair("i/h rps", "i", "h", "rps", lambda x, y: x / y)  # the floor of the g/h target
    pair("i-c cpu us", "i", "c", "cpu_us_per_req", lambda x, y: x - y)
    pair("g-d cpu us", "g", "d", "cpu_us_per_req", lambda x, y: x - y)
    pair("g/d rps", "g", "d", "rps", lambda x, y: x / y)
    pair("x/d rps", "x", "d", "rps", lambda x, y: x / y)
    pair("x-d cpu us", "x", "d", "cpu_us_per_req", lambda x, y: x - y)
    pair("y/g rps", "y", "g", "rps", lambda x, y: x / y)
    pair("y-g cpu us", "y", "g", "cpu_us_per_req", lambda x, y: x - y)
    ratio_medians = {k: median(v) for k, v in paired.items()}

    wasm_bytes = filter_wasm.stat().st_size
    checks = []

    def check(label, value, ok):
        checks.append({"target": label, "value": value, "pass": None if value is None else ok(value)})

    t = TARGETS
    check(f"CPU (d)-(c) <= {t['d_minus_c_over_f_minus_c_max']} x CPU (f)-(c)", ratio_medians.get("(d-c)/(f-c) cpu"),
          lambda v: v <= t["d_minus_c_over_f_minus_c_max"])
    check(f"CPU (g) <= CPU (i) + {t['g_minus_i_cpu_us_max']:g} us/request", ratio_medians.get("g-i cpu us"),
          lambda v: v <= t["g_minus_i_cpu_us_max"])
    check(f"(g)/(h) req/s >= {t['g_over_h_rps_min']}", ratio_medians.get("g/h rps"),
          lambda v: v >= t["g_over_h_rps_min"])
    check(f"release .wasm <= {t['wasm_bytes_max']:,} bytes", wasm_bytes,
          lambda v: v <= t["wasm_bytes_max"])

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
        "probe_plans": {"f": FLOOR_PASS, "i": FLOOR_429},
        "wasm_bytes": {"filter": wasm_bytes, "empty_filter": EMPTY_WASM.stat().st_size,
                       "probe_filter": PROBE_WASM.stat().st_size},
        "median": summary,
        "paired": paired,
        "paired_median": ratio_medians,
        "checks": checks,
        "harness_failures": failures,
        "elapsed_s": round(time.time() - started, 1),
    })
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1) + "\n")
    default_out = Path(p.get_default("out"))
    svg_path = Path(args.svg) if args.svg else (
        default_out.parent / "bench.svg" if out_path == default_out else out_path.with_suffix(".svg"))
    svg_path.write_text(draw_rounds(results))

    print()
    print(f"Envoy {results['envoy']} --concurrency 1 on CPU {args.envoy_cpu}, wrk -t1 -c{args.connections} on CPU "
          f"{args.load_cpu}; {args.rounds} interleaved rounds of {args.seconds} s; medians; commit {results['commit']}")
    print(f"{'config':38} {'req/s':>9} {'p50 µs':>8} {'p99 µs':>8} {'CPU µs/req':>11} {'RSS MB':>7}"
          f" {'Envoy CPU':>9} {'wrk CPU':>8}")
    for n in args.configs:
        s = summary[n]
        print(f"({n}) {CONFIGS[n]:34} {fmt(s['rps'], '9.0f')} {fmt(s['p50_us'], '8.0f')} {fmt(s['p99_us'], '8.0f')} "
              f"{fmt(s['cpu_us_per_req'], '11.2f')} {fmt(s['rss_mb'], '7.1f')}"
              f" {fmt(s['envoy_cpu_share'], '9.0%')} {fmt(s['wrk_cpu_share'], '8.0%')}")
    print()
    for k, v in paired.items():
        spec = ".3f" if "rps" in k or "/" in k else "+.2f"
        print(f"{k:11} median {fmt(ratio_medians[k], spec):>7}   rounds: " + " ".join(format(x, spec) for x in v))
    if "cas" in results:
        c = results["cas"]
        rate = c["cas_retry_rate"]
        print(f"\n(d) at --concurrency 2: {c['rps']:.0f} req/s, allowed {c['allowed']}, cas_retries {c['cas_retries']}"
              f" -> retry rate {fmt(rate, '.2e')} per allowed request; store_errors {c['store_errors']}")
        h = c["one_bucket"]
        print(f"  worst case, one address and one route: {h['rps']:.0f} req/s, allowed {h['allowed']}, cas_retries"
              f" {h['cas_retries']} -> {fmt(h['cas_retry_rate'], '.2e')}; store_errors {h['store_errors']}")
    if "g_metrics_during_rounds" in results:
        gm = results["g_metrics_during_rounds"]
        print(f"(g) during the rounds: limited {gm['limited']}, allowed {gm['allowed']}, store_errors"
              f" {gm['store_errors']}")
    if "e_upstream_me_calls_during_rounds" in results:
        print(f"(e): /api/v1/me callouts during the measured rounds: {results['e_upstream_me_calls_during_rounds']};"
              f" bypassed {results['e_metrics'].get('bypassed')}, allowed {results['e_metrics'].get('allowed')}")
    print()
    for c in checks:
        verdict = "n/a " if c["pass"] is None else ("PASS" if c["pass"] else "FAIL")
        v = c["value"]
        shown = "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
        print(f"{verdict}  {c['target']:42} {shown}")
    print(f"\nwritten: {out_path}, {svg_path}")
    for f in failures:
        print(f"HARNESS: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
