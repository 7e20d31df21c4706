#!/usr/bin/env python3
"""A small Rocket.Chat-compatible upstream: the demo behind `make run` and the upstream of the
tests.

It answers the REST API the way Rocket.Chat shapes its answers:
- `GET /api/info` → `{"version": ..., "success": true}` (unversioned, never limited);
- `GET /api/v1/me` with `X-User-Id` / `X-Auth-Token` → `{"_id", "username", "roles",
  "success": true}`, or 401 `{"status": "error", "message": "You must be logged in to do this."}`;
- `GET /api/v1/permissions.listAll` (service account) → `{"update": [{"_id", "roles"}, ...],
  "remove": [], "success": true}`;
- anything else under `/api/` → 200 `{"success": true, "path": ..., "method": ...}`.

Tests steer it through `/__control` (JSON POST: users, permission roles, fault mode and delay)
and read what it saw from `/__stats`. Fault modes apply to the two bypass endpoints only:
`slow` (sleep `delay_ms`), `500`, `reset` (close without answering), `garbage` (200 with a
body that is not JSON), `mismatch` (another user's `_id`), `flaky` (every tenth answer a 500).

Run: python3 rocketchat_demo.py --port 3000
"""

import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE_LOCK = threading.Lock()
DEFAULT_USERS = {
    # user id: (token, roles)
    "admin-id": ("admin-token", ["admin", "user"]),
    "bot-id": ("bot-token", ["bot"]),
    "alice-id": ("alice-token", ["user"]),
}


def fresh_state():
    return {
        "users": {uid: {"token": t, "roles": r} for uid, (t, r) in DEFAULT_USERS.items()},
        "service": {"id": "service-id", "token": "service-token"},
        "permission_roles": {"api-bypass-rate-limit": ["admin", "bot", "app"]},
        "fault": None,
        # Like a Rocket.Chat whose own (per-process) limiter is still on.
        "own_ratelimit_headers": False,
        "delay_ms": 0,
        "hits": {},
        "me_calls": {},
        "permissions_calls": 0,
        "callout_headers": [],
    }


STATE = fresh_state()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "RocketChatDemo/1.0"
    # Headers and body go out in two writes; without this, Nagle + delayed ACK add 40 ms.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # quiet: tests and the demo print their own output
        pass

    def _send(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        if STATE["own_ratelimit_headers"]:
            self.send_header("X-RateLimit-Limit", "999")
            self.send_header("X-RateLimit-Remaining", "998")
            self.send_header("X-RateLimit-Reset", "1")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _fault(self):
        """Applies the configured fault to a bypass endpoint. True when it answered."""
        with STATE_LOCK:
            fault, delay = STATE["fault"], STATE["delay_ms"]
        if fault == "flaky":
            # One answer in ten is a 500 (the soak test's failing callouts).
            with STATE_LOCK:
                STATE["flaky_count"] = STATE.get("flaky_count", 0) + 1
                fail = STATE["flaky_count"] % 10 == 0
            if fail:
                self._send(500, {"success": False, "error": "flaky"})
                return True
            return False
        if fault == "slow":
            time.sleep(delay / 1000.0)
            return False
        if fault == "500":
            self._send(500, {"success": False, "error": "boom"})
            return True
        if fault == "reset":
            try:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            except OSError:
                pass
            self.close_connection = True
            self.connection.close()
            return True
        if fault == "garbage":
            self._send(200, b"<html>not json", "text/html")
            return True
        return False

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_OPTIONS(self):
        self._handle("OPTIONS")

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _handle(self, method):
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if path == "/__control":
            return self._control(body)
        if path == "/__stats":
            with STATE_LOCK:
                return self._send(200, {k: STATE[k] for k in (
                    "hits", "me_calls", "permissions_calls", "callout_headers")})
        with STATE_LOCK:
            STATE["hits"][path] = STATE["hits"].get(path, 0) + 1
        if path == "/api/info":
            return self._send(200, {"version": "7.0.0-demo", "success": True})
        if path == "/api/v1/me":
            return self._me()
        if path == "/api/v1/permissions.listAll":
            return self._permissions()
        if path.startswith("/api/"):
            return self._send(200, {"success": True, "path": path, "method": method})
        return self._send(404, {"success": False, "error": "Not found"})

    def _record_callout(self):
        with STATE_LOCK:
            STATE["callout_headers"].append({
                "path": self.path,
                "x-user-id": self.headers.get("X-User-Id"),
                "x-real-ip": self.headers.get("X-Real-IP"),
                "x-forwarded-for": self.headers.get("X-Forwarded-For"),
            })
            del STATE["callout_headers"][:-50]

    def _me(self):
        uid = self.headers.get("X-User-Id")
        token = self.headers.get("X-Auth-Token")
        self._record_callout()
        with STATE_LOCK:
            STATE["me_calls"][uid or ""] = STATE["me_calls"].get(uid or "", 0) + 1
            user = STATE["users"].get(uid)
            fault = STATE["fault"]
        if self._fault():
            return
        if not user or user["token"] != token:
            return self._send(401, {"status": "error", "message": "You must be logged in to do this."})
        answer_id = "someone-else" if fault == "mismatch" else uid
        return self._send(200, {"_id": answer_id, "username": uid.split("-")[0],
                                "roles": user["roles"], "active": True, "success": True})

    def _permissions(self):
        uid = self.headers.get("X-User-Id")
        token = self.headers.get("X-Auth-Token")
        self._record_callout()
        with STATE_LOCK:
            STATE["permissions_calls"] += 1
            service = STATE["service"]
            perms = dict(STATE["permission_roles"])
        if self._fault():
            return
        if uid != service["id"] or token != service["token"]:
            return self._send(401, {"status": "error", "message": "You must be logged in to do this."})
        update = [{"_id": name, "roles": roles, "_updatedAt": "2026-01-01T00:00:00.000Z"}
                  for name, roles in perms.items()]
        update.append({"_id": "view-room", "roles": ["user", "admin"]})
        return self._send(200, {"update": update, "remove": [], "success": True})

    def _control(self, body):
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return self._send(400, {"success": False})
        with STATE_LOCK:
            if req.get("reset"):
                fresh = fresh_state()
                STATE.clear()
                STATE.update(fresh)
            for key in ("fault", "delay_ms", "permission_roles", "service", "own_ratelimit_headers"):
                if key in req:
                    STATE[key] = req[key]
            for uid, user in (req.get("users") or {}).items():
                if user is None:
                    STATE["users"].pop(uid, None)
                else:
                    STATE["users"][uid] = user
        return self._send(200, {"success": True})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    server = Server((args.host, args.port), Handler)
    print(f"rocketchat demo upstream on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
