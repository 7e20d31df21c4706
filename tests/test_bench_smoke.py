"""`make bench` must not rot: the same harness, one round of 1 s per configuration (issues 5
and 13).

It checks that the harness works (every configuration starts, answers 200 with x-ratelimit-*
headers exactly where a limiter runs, or a 429 to every request where a flood is measured; wrk
sees no errors; the JSON report is complete and the SVG drawn), not the performance targets:
one second on a shared machine says nothing about them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

EMPTY_WASM = Path(os.environ.get("BENCH_EMPTY_WASM", ROOT / "target" / "bench" / "bench_empty_filter.wasm"))
PROBE_WASM = Path(os.environ.get(
    "BENCH_PROBE_WASM",
    ROOT / "target" / "bench" / "probe-filter" / "wasm32-wasip1" / "release" / "bench_probe_filter.wasm"))
CONFIGS = "abcdefghi"
ALL_429 = "ghi"


def test_bench_smoke(tmp_path):
    # Built by `make bench-empty-filter` (cargo, then wasm-opt like the filter) and
    # `make bench-probe-filter`, which `make e2e` runs first.
    assert EMPTY_WASM.is_file(), f"{EMPTY_WASM} missing: run `make bench-empty-filter`"
    assert PROBE_WASM.is_file(), f"{PROBE_WASM} missing: run `make bench-probe-filter`"
    out = tmp_path / "results.json"
    env = dict(os.environ, BENCH_EMPTY_WASM=str(EMPTY_WASM), BENCH_PROBE_WASM=str(PROBE_WASM))
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--rounds", "1", "--seconds", "1",
         "--warmup", "1", "--cas-seconds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads(out.read_text())
    assert r["harness_failures"] == []
    assert set(r["sanity"]) == set(CONFIGS) and all(s["ok"] for s in r["sanity"].values()), r["sanity"]
    # The floor of a 429 answers like the filter's: same headers, same body size (give or take
    # one digit of the wait).
    assert r["sanity"]["g"]["retry-after"] and r["sanity"]["i"]["retry-after"]
    assert abs(r["sanity"]["g"]["body_bytes"] - r["sanity"]["i"]["body_bytes"]) <= 1, r["sanity"]
    assert len(r["rounds"]) == 1
    for name in CONFIGS:
        m = r["rounds"][0][name]
        assert m["requests"] > 100, (name, m)
        errors = dict(m["errors"])
        if name in ALL_429:
            assert errors.pop("status") == m["requests"], (name, m)  # every response a 429
        assert not any(errors.values()), (name, m)
        assert m["cpu_us_per_req"] > 0 and m["rss_mb"] > 0 and m["p99_us"] >= m["p50_us"] > 0
    assert set(r["paired_median"]) >= {"d/c rps", "d-c cpu us", "f-c cpu us", "(d-c)/(f-c) cpu",
                                       "g-i cpu us", "g/h rps"}
    assert [c["pass"] is not None for c in r["checks"]] == [True] * 4
    # (d) counted every request and rejected none; the cas run produced its rate.
    assert r["d_metrics_concurrency_1"]["allowed"] > 0 and r["d_metrics_concurrency_1"]["limited"] == 0
    assert r["cas"]["allowed"] > 0 and r["cas"]["cas_retry_rate"] is not None
    # (e) is counted (alice does not bypass) and its requests never wait on a callout.
    assert r["e_metrics"]["allowed"] > 0 and r["e_metrics"]["limited"] == 0
    # (g) limited every request of the round and let none through.
    assert r["g_metrics_during_rounds"]["allowed"] == 0 and r["g_metrics_during_rounds"]["limited"] > 0
    for line in ("CPU (d)-(c) <= 1.1 x CPU (f)-(c)", "CPU (g) <= CPU (i) + 2", "(g)/(h) req/s >= 0.9",
                 "release .wasm"):
        assert line in run.stdout
    svg = (tmp_path / "results.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<circle") >= 2 * len(CONFIGS)
