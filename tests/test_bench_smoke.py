"""`make bench` must not rot: the same harness, one round of 1 s per configuration (issue 5).

It checks that the harness works (every configuration starts, answers 200 with x-ratelimit-*
headers exactly where a limiter runs, wrk sees no errors, the JSON report is complete), not the
performance targets: one second on a shared machine says nothing about them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

EMPTY_WASM = Path(os.environ.get("BENCH_EMPTY_WASM", ROOT / "target" / "bench" / "bench_empty_filter.wasm"))


def test_bench_smoke(tmp_path):
    # Built (cargo, then wasm-opt like the filter) by `make bench-empty-filter`, which
    # `make e2e` runs first.
    assert EMPTY_WASM.is_file(), f"{EMPTY_WASM} missing: run `make bench-empty-filter`"
    out = tmp_path / "results.json"
    env = dict(os.environ, BENCH_EMPTY_WASM=str(EMPTY_WASM))
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--rounds", "1", "--seconds", "1",
         "--warmup", "1", "--cas-seconds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads(out.read_text())
    assert r["harness_failures"] == []
    assert set(r["sanity"]) == set("abcde") and all(s["ok"] for s in r["sanity"].values()), r["sanity"]
    assert len(r["rounds"]) == 1
    for name in "abcde":
        m = r["rounds"][0][name]
        assert m["requests"] > 100, (name, m)
        assert not any(m["errors"].values()), (name, m)
        assert m["cpu_us_per_req"] > 0 and m["rss_mb"] > 0 and m["p99_us"] >= m["p50_us"] > 0
    assert set(r["paired_median"]) >= {"d/c rps", "d/b rps", "e/d rps", "d-c cpu us"}
    assert [c["pass"] is not None for c in r["checks"]] == [True] * 4
    # (d) counted every request and rejected none; the cas run produced its rate.
    assert r["d_metrics_concurrency_1"]["allowed"] > 0 and r["d_metrics_concurrency_1"]["limited"] == 0
    assert r["cas"]["allowed"] > 0 and r["cas"]["cas_retry_rate"] is not None
    # (e) is counted (alice does not bypass) and its requests never wait on a callout.
    assert r["e_metrics"]["allowed"] > 0 and r["e_metrics"]["limited"] == 0
    for line in ("(d)/(c) req/s", "CPU (d)-(c)", "(e)/(d) req/s", "release .wasm"):
        assert line in run.stdout
