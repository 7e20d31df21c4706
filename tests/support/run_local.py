#!/usr/bin/env python3
"""`make run`: starts Envoy with envoy/envoy.yaml and the built filter, in front of a real
Rocket.Chat (ROCKETCHAT_UPSTREAM=host:port) or of the built-in demo upstream, prints what to
curl, and stops everything on Ctrl-C.

The shipped envoy/envoy.yaml is used as it is, with four local substitutions: the .wasm path,
the upstream address, the listener port (ENVOY_PORT, 8080) and the admin port (ADMIN_PORT,
9901)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def local_config(wasm, upstream_host, upstream_port, listen_port, admin_port):
    config = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = listen_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for f in hcm["http_filters"]:
        if f["name"] == "envoy.filters.http.wasm":
            f["typed_config"]["config"]["vm_config"]["code"]["local"]["filename"] = str(wasm)
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "rocketchat":
            sa = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            sa["address"], sa["port_value"] = upstream_host, upstream_port
    return config


def main():
    wasm = Path(os.environ.get("FILTER_WASM", ROOT / "target/rocketchat_ratelimit.wasm"))
    envoy = os.environ.get("ENVOY_BIN", str(ROOT / ".venv/bin/envoy"))
    listen_port = int(os.environ.get("ENVOY_PORT", "8080"))
    admin_port = int(os.environ.get("ADMIN_PORT", "9901"))
    upstream = os.environ.get("ROCKETCHAT_UPSTREAM", "")
    children = []

    if upstream:
        host, _, port = upstream.rpartition(":")
        host, port = host or upstream, int(port or 3000)
        print(f"upstream: Rocket.Chat at {host}:{port} (ROCKETCHAT_UPSTREAM)")
    else:
        host, port = "127.0.0.1", int(os.environ.get("DEMO_PORT", "3000"))
        children.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests/support/rocketchat_demo.py"), "--port", str(port)]))
        print(f"upstream: built-in demo Rocket.Chat on 127.0.0.1:{port} "
              "(set ROCKETCHAT_UPSTREAM=host:port for a real one)")

    out = ROOT / "target" / "run"
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "envoy.yaml"
    config_path.write_text(yaml.safe_dump(local_config(wasm, host, port, listen_port, admin_port), sort_keys=False))
    envoy_proc = subprocess.Popen([envoy, "-c", str(config_path), "--concurrency", "2", "--log-level", "info",
                                   "--component-log-level", "wasm:info", "--base-id", str(listen_port)])
    children.append(envoy_proc)

    def stop(*_):
        for c in reversed(children):
            if c.poll() is None:
                c.terminate()
        for c in children:
            try:
                c.wait(10)
            except subprocess.TimeoutExpired:
                c.kill()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(1.5)
    base = f"http://127.0.0.1:{listen_port}"
    print(f"""
Envoy with the rocketchat-ratelimit filter is listening on {base} (admin 127.0.0.1:{admin_port}).
Try:
  curl -i {base}/api/v1/users.info                  # x-ratelimit-limit: 10, remaining 9..0
  for i in $(seq 11); do curl -s -o /dev/null -w '%{{http_code}} ' {base}/api/v1/users.info; done; echo
                                                     # ten 200s, then 429
  curl -i -X POST {base}/api/v1/users.register     # preset: 1 per minute
  curl -i {base}/api/info                            # unversioned: never limited, no headers
  curl -s 127.0.0.1:{admin_port}/stats/prometheus | grep rocketchat_ratelimit
Ctrl-C stops Envoy{'' if upstream else ' and the demo upstream'}.
""", flush=True)
    while all(c.poll() is None for c in children):
        time.sleep(0.5)
    print("a child process exited; stopping", file=sys.stderr)
    stop()


if __name__ == "__main__":
    main()
