"""Configuration pushes keep counts (issue 6, SPEC §7): Envoy loads the filter from a file-based
LDS that it watches; the test rewrites that file while traffic flows."""

import json
import os
import threading
import time

from conftest import Envoy, envoy_config, free_port, wasm_filter


class LdsEnvoy:
    """An Envoy whose listener (and so the filter's configuration) comes from a watched file."""

    def __init__(self, tmp_path, upstream_port, plugin_config):
        self.dir = tmp_path / "lds"
        self.dir.mkdir()
        self.port, self.admin_port, self.upstream_port = free_port(), free_port(), upstream_port
        self.push(plugin_config, wait=False)
        base = envoy_config(self.port, self.admin_port, upstream_port, [])
        boot = {
            "node": {"id": "push-test", "cluster": "push-test"},
            "admin": base["admin"],
            "dynamic_resources": {"lds_config": {"resource_api_version": "V3", "path_config_source": {
                "path": str(self.dir / "lds.json"), "watched_directory": {"path": str(self.dir)}}}},
            "static_resources": {"clusters": base["static_resources"]["clusters"]},
        }
        self.envoy = Envoy(tmp_path, config=boot, concurrency=2)
        self.envoy.port, self.envoy.admin_port = self.port, self.admin_port
        self.envoy.config_path.write_text(json.dumps(boot))

    def push(self, plugin_config, wait=True):
        """Writes a new listener (atomically, as Envoy's file watch expects) and waits until
        Envoy has taken it (accepted or rejected)."""
        before = self._lds_attempts() if wait else 0
        listener = envoy_config(self.port, 0, self.upstream_port,
                                [wasm_filter(plugin_config)])["static_resources"]["listeners"][0]
        listener["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
        tmp = self.dir / "lds.json.tmp"
        tmp.write_text(json.dumps({"resources": [listener]}))
        os.rename(tmp, self.dir / "lds.json")
        if wait:
            deadline = time.time() + 10
            while self._lds_attempts() == before:
                assert time.time() < deadline, "Envoy did not pick up the push"
                time.sleep(0.05)
            time.sleep(0.3)  # let workers swap in the new filter chain

    def _lds_attempts(self):
        s = self.envoy.stats()
        return s.get("listener_manager.lds.update_success", 0) + s.get("listener_manager.lds.update_rejected", 0)


def remaining(envoy, path="/api/v1/push.me"):
    r = envoy.request("GET", path)  # a new connection: it gets the newest configuration
    return r.status, r.headers.get("x-ratelimit-remaining")


def test_pushes_keep_counts_and_a_rejected_push_keeps_the_old_config(tmp_path, upstream):
    lds = LdsEnvoy(tmp_path, upstream.port, {"default": {"numRequestsAllowed": 10}})
    envoy = lds.envoy.start()
    try:
        # Background traffic during every push: no request may fail.
        stop = threading.Event()
        failures, done = [], [0]

        def background():
            while not stop.is_set():
                try:
                    r = envoy.request("GET", "/api/v1/background.traffic", xff=None)
                    if r.status >= 500:
                        failures.append(r)
                    done[0] += 1
                except Exception as e:  # noqa: BLE001 - any failure is what we look for
                    failures.append(e)

        t = threading.Thread(target=background)
        t.start()
        try:
            assert [remaining(envoy) for _ in range(7)] == [(200, str(9 - i)) for i in range(7)]
            # A push that changes another route's limit: 3 left.
            lds.push({"default": {"numRequestsAllowed": 10},
                      "routes": [{"path": "/api/v1/other.route", "rateLimiterOptions": {"numRequestsAllowed": 2}}]})
            assert remaining(envoy) == (200, "2")
            assert envoy.request("GET", "/api/v1/other.route").headers["x-ratelimit-limit"] == "2"
            # A push that lowers this route's limit applies it to the count already made (8).
            lds.push({"default": {"numRequestsAllowed": 9}})
            assert remaining(envoy) == (200, "0")
            assert remaining(envoy) == (429, "0")
            # A rejected push: the old configuration keeps serving, counts intact.
            rejected_before = envoy.stats().get("listener_manager.lds.update_rejected", 0)
            lds.push({"default": {"numRequestsAllowed": 0}})
            assert envoy.stats()["listener_manager.lds.update_rejected"] == rejected_before + 1
            assert remaining(envoy) == (429, "0")
            assert "invalid configuration: default.numRequestsAllowed: must be a positive integer" in envoy.logs()
            # Raising the limit gives the rest of the window back.
            lds.push({"default": {"numRequestsAllowed": 12}})
            assert remaining(envoy) == (200, "2")
        finally:
            stop.set()
            t.join()
        assert not failures, failures[:3]
        assert done[0] > 20
    finally:
        envoy.stop()


def counted(envoy, path):
    """(status, limit, remaining) of one request on a new connection (the newest config)."""
    r = envoy.request("GET", path)
    return r.status, r.headers.get("x-ratelimit-limit"), r.headers.get("x-ratelimit-remaining")


def test_a_path_that_gets_its_own_entry_keeps_its_count(tmp_path, upstream):
    """Issue 12 item 5, SPEC §3.4, §11: the bucket is the path or the pattern, not the entry, so
    a push that gives a path an entry of its own (or takes it away) keeps the client's count,
    and so does a push that renames a pattern's parameter or changes its limit."""
    lds = LdsEnvoy(tmp_path, upstream.port, {})
    envoy = lds.envoy.start()
    try:
        left = 60_000 - int(time.time() * 1000) % 60_000
        if left < 25_000:  # every step below in one window
            time.sleep(left / 1000 + 0.05)
        info = "/api/v1/users.info"
        assert [counted(envoy, info) for _ in range(8)] == [(200, "10", str(9 - i)) for i in range(8)]
        # 8 of 10 used under `default`; the path gets an entry of its own with limit 20.
        lds.push({"routes": [{"path": info, "method": "GET", "rateLimiterOptions": {"numRequestsAllowed": 20}}]})
        assert counted(envoy, info) == (200, "20", "11")
        # And back to `default`: 10 used, then the 429.
        lds.push({})
        assert counted(envoy, info) == (200, "10", "0")
        assert counted(envoy, info) == (429, "10", "0")

        # A pattern entry that starts to match a path counts in the pattern's bucket, shared by
        # every value; the path's own count waits in the path's bucket.
        rooms = "/api/v1/rooms.x/"
        assert [counted(envoy, rooms + "a") for _ in range(3)] == [(200, "10", str(9 - i)) for i in range(3)]
        lds.push({"routes": [{"path": rooms + ":id", "rateLimiterOptions": {"numRequestsAllowed": 20}}]})
        assert counted(envoy, rooms + "a") == (200, "20", "19")
        assert counted(envoy, rooms + "b") == (200, "20", "18")
        # The same pattern with another parameter name, for GET only, and another limit: the
        # same bucket.
        lds.push({"routes": [{"path": rooms + ":rid", "method": "GET",
                              "rateLimiterOptions": {"numRequestsAllowed": 30}}]})
        assert counted(envoy, rooms + "c") == (200, "30", "27")
        # The pattern goes away: the path's own count is there again.
        lds.push({})
        assert counted(envoy, rooms + "a") == (200, "10", "6")
        assert counted(envoy, rooms + "b") == (200, "10", "9")
    finally:
        envoy.stop()
