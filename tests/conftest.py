"""Harness for the end-to-end tests: a real Envoy (from the project's virtualenv) loading the
built .wasm, in front of the Rocket.Chat-compatible demo upstream.

Environment (set by the Makefile):
- ENVOY_BIN: the envoy binary. Missing → the tests fail (they never skip).
- FILTER_WASM: the release .wasm of the filter.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# More than one metrics flush of the filter (METRICS_FLUSH_MS = 100 in src/filter.rs).
METRICS_FLUSH_WAIT_S = 0.25

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "support"
ENVOY_BIN = os.environ.get("ENVOY_BIN", str(ROOT / ".venv" / "bin" / "envoy"))
FILTER_WASM = os.environ.get(
    "FILTER_WASM", str(ROOT / "target" / "rocketchat_ratelimit.wasm")
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Upstream:
    """The demo upstream in its own process."""

    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(SUPPORT / "rocketchat_demo.py"), "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._up, 10, "demo upstream")

    def _up(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True

    def control(self, **kwargs):
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/__control",
            data=json.dumps(kwargs).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)

    def stats(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/__stats", timeout=5) as r:
            return json.load(r)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wasm_filter(plugin_config, wasm_path=FILTER_WASM, name="rocketchat_ratelimit", failure_policy=None):
    text = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    f = {
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": name,
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": text,
                },
                "vm_config": {
                    "vm_id": name,
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm_path}},
                },
            },
        },
    }
    if failure_policy:
        f["typed_config"]["config"]["failure_policy"] = failure_policy
    return f


def envoy_config(listen_port, admin_port, upstream_port, http_filters, xff_trusted_hops=0,
                 normalize=True, direct_response=False):
    if direct_response:
        route = {"match": {"prefix": "/"},
                 "direct_response": {"status": 200, "body": {"inline_string": "{\"success\":true}"}}}
    else:
        route = {"match": {"prefix": "/"}, "route": {"cluster": "rocketchat", "timeout": "10s"}}
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "use_remote_address": True,
        "xff_num_trusted_hops": xff_trusted_hops,
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
        "http_filters": http_filters + [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    }
    if normalize:
        hcm["normalize_path"] = True
        hcm["merge_slashes"] = True
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": [{
                "name": "rocketchat",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "rocketchat", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": upstream_port}}}}]}]},
            }],
        },
    }


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = dict(headers)  # lower-case name → value (last one wins)
        self.header_list = headers  # every (lower-case name, value), repeats included
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.headers} {self.body[:200]!r}>"


class Envoy:
    def __init__(self, tmp_path, plugin_config="{}", upstream_port=None, concurrency=2,
                 xff_trusted_hops=0, normalize=True, direct_response=False, http_filters=None,
                 log_level="info", config=None):
        if not Path(ENVOY_BIN).exists():
            raise AssertionError(f"envoy not found at {ENVOY_BIN}: run the tests through `make test`")
        if not Path(FILTER_WASM).exists():
            raise AssertionError(f"filter not built at {FILTER_WASM}: run the tests through `make test`")
        self.tmp = Path(tmp_path)
        self.port = free_port()
        self.admin_port = free_port()
        filters = http_filters if http_filters is not None else [wasm_filter(plugin_config)]
        self.config = config or envoy_config(self.port, self.admin_port, upstream_port or free_port(),
                                             filters, xff_trusted_hops, normalize, direct_response)
        self.config_path = self.tmp / f"envoy-{self.port}.json"
        self.config_path.write_text(json.dumps(self.config, indent=1))
        self.log_path = self.tmp / f"envoy-{self.port}.log"
        self.concurrency = concurrency
        self.log_level = log_level
        self.proc = None

    def command(self):
        return [ENVOY_BIN, "-c", str(self.config_path), "--concurrency", str(self.concurrency),
                "--base-id", str(self.port), "--log-level", self.log_level,
                "--component-log-level", "wasm:debug", "--drain-time-s", "1"]

    def start(self, timeout=60):
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout, f"envoy ready (log {self.log_path})")
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"envoy exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
            if r.read().strip() != b"LIVE":
                return False
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True

    def run_expecting_failure(self, timeout=60):
        """Starts Envoy with a config it must refuse; returns (exit code, log)."""
        with open(self.log_path, "wb") as log:
            proc = subprocess.run(self.command(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        return proc.returncode, self.logs()

    def logs(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def pid(self):
        return self.proc.pid

    def rss_kb(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def admin(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as r:
            return r.read().decode()

    def stats(self):
        out = {}
        for line in self.admin("/stats").splitlines():
            name, _, value = line.partition(": ")
            try:
                out[name] = int(value)
            except ValueError:
                pass
        return out

    def metric(self, name):
        self.wait_for_metrics()
        return self.stats()[f"wasmcustom.rocketchat_ratelimit.{name}"]

    def prometheus(self):
        self.wait_for_metrics()
        return self.admin("/stats/prometheus")

    @staticmethod
    def wait_for_metrics():
        """The filter batches its counts and hands them to Envoy on its tick (every 100 ms
        without bypass, 20 ms with it): wait out one flush before reading them."""
        time.sleep(METRICS_FLUSH_WAIT_S)

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def request(self, method, path, headers=None, conn=None, xff=None):
        own = conn is None
        conn = conn or self.connection()
        hdrs = dict(headers or {})
        if xff:
            hdrs["X-Forwarded-For"] = xff
        try:
            conn.request(method, path, headers=hdrs)
            r = conn.getresponse()
            body = r.read()
            return Response(r.status, [(k.lower(), v) for k, v in r.getheaders()], body)
        finally:
            if own:
                conn.close()


@pytest.fixture(scope="session")
def upstream():
    u = Upstream()
    yield u
    u.stop()


@pytest.fixture
def envoy_factory(tmp_path, upstream):
    started = []

    def make(plugin_config="{}", **kwargs):
        kwargs.setdefault("upstream_port", upstream.port)
        e = Envoy(tmp_path, plugin_config, **kwargs)
        started.append(e)
        return e

    yield make
    for e in started:
        e.stop()
