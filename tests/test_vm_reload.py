"""A crashed VM comes back (issue 6): with FAIL_RELOAD (as the shipped configs set it) Envoy
replaces a trapped VM, and the counts, kept in shared data, survive. The trap is triggered by
a test-only build (cargo feature `test-trap`), never present in the release .wasm."""

import os
import time
from pathlib import Path

from conftest import FILTER_WASM, wasm_filter

TRAP_WASM = os.environ.get("TEST_TRAP_WASM", str(
    Path(__file__).resolve().parent.parent / "target/test-trap/wasm32-wasip1/release/rocketchat_ratelimit_wasm.wasm"))
TRAP_HEADER = "x-rocketchat-ratelimit-test-trap"


def test_release_build_has_no_trap():
    assert TRAP_HEADER.encode() not in Path(FILTER_WASM).read_bytes()
    assert TRAP_HEADER.encode() in Path(TRAP_WASM).read_bytes()


def test_a_trapped_vm_is_reloaded_and_counts_survive(envoy_factory):
    cfg = {"default": {"numRequestsAllowed": 5}}
    envoy = envoy_factory(http_filters=[wasm_filter(cfg, wasm_path=TRAP_WASM, failure_policy="FAIL_RELOAD")],
                          concurrency=1).start()
    conn = envoy.connection()
    assert [envoy.request("GET", "/api/v1/crash.me", conn=conn).headers["x-ratelimit-remaining"]
            for _ in range(2)] == ["4", "3"]
    conn.close()
    crashed = envoy.request("GET", "/api/v1/crash.me", {TRAP_HEADER: "1"})
    assert crashed.status >= 500  # the request that hit the trap fails; the next ones must not
    deadline = time.time() + 10
    while True:
        r = envoy.request("GET", "/api/v1/crash.me")
        if r.status == 200 or time.time() > deadline:
            break
        time.sleep(0.1)
    # Back, with the count of before the crash (the trapped request was never counted).
    assert r.status == 200 and r.headers["x-ratelimit-remaining"] == "2", r
    assert [envoy.request("GET", "/api/v1/crash.me").status for _ in range(3)] == [200, 200, 429]
    stats = envoy.stats()
    assert stats["wasm.rocketchat_ratelimit.vm_reload_success"] >= 1, {k: v for k, v in stats.items() if "wasm." in k}
