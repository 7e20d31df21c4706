"""The replica-wide stack of `global` mode (SPEC §10) for the tests and the benchmark: a real
redis-server, the reference Rate Limit Service (tools/ratelimit-engine) and the Envoy config
with its HTTP/2 `ratelimit` cluster. Everything is started on loopback and stopped by PID."""

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

from conftest import envoy_config, free_port, wait_for, wasm_filter

ENGINE_BIN = os.environ.get(
    "ENGINE_BIN", str(Path(__file__).resolve().parent.parent / "target/engine/release/ratelimit-engine"))


class Redis:
    """A throwaway redis-server on loopback (no persistence); stop() and start() again keep
    its port (a restart, for the tests of the engine's reconnection)."""

    def __init__(self, tmp_path):
        if subprocess.run(["which", "redis-server"], capture_output=True).returncode != 0:
            raise AssertionError("redis-server not installed: run the tests through `make test`")
        self.port = free_port()
        self.dir = tmp_path
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: self.command("PING") == b"+PONG", 10, "redis-server")
        except BaseException:
            self.stop()
            raise
        return self

    def command(self, *words):
        """One RESP command, e.g. command("PING") → b"+PONG"."""
        request = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(request.encode())
            return s.recv(65536).strip()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# The line the engine prints once it serves: address, domain(s), Redis.
BANNER = re.compile(r"(?m)^ratelimit-engine listening on (\S+) \(domain (.*), redis (\S+)\)$")


class Engine:
    """tools/ratelimit-engine (`make engine`) with one config file (written for `domain`, or
    `config_path` as given), on a loopback port that stays the same across restarts."""

    def __init__(self, tmp_path, redis_port, domain="rocketchat", config_path=None):
        if not Path(ENGINE_BIN).exists():
            raise AssertionError(f"engine not built at {ENGINE_BIN}: run the tests through `make test`")
        if config_path is None:
            config_path = tmp_path / f"engine-{domain}.yaml"
            config_path.write_text(f"domain: {domain}\n")
        self.config = Path(config_path)
        self.redis_port = redis_port
        self.port = free_port()
        self.proc = None
        self.banner = None
        self.log_path = tmp_path / f"engine-{self.port}.log"

    def start(self):
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [ENGINE_BIN, "--listen", f"127.0.0.1:{self.port}", "--redis", f"127.0.0.1:{self.redis_port}",
             "--config", str(self.config)], stdout=self.log, stderr=self.log)

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"ratelimit-engine exited with {self.proc.returncode}: {self.logs()}")
            self.banner = BANNER.search(self.logs()[offset:])
            return self.banner is not None

        try:
            wait_for(listening, 10, f"ratelimit-engine (log {self.log_path})")
        except BaseException:
            self.stop()
            raise
        return self

    def logs(self):
        return self.log_path.read_text(errors="replace")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()


def global_envoy_config(listen_port, admin_port, upstream_port, engine_port, plugin_config):
    config = envoy_config(listen_port, admin_port, upstream_port, [wasm_filter(plugin_config)],
                          xff_trusted_hops=1)
    config["static_resources"]["clusters"].append({
        "name": "ratelimit",
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {"cluster_name": "ratelimit", "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": engine_port}}}}]}]},
    })
    return config
