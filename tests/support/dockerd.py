#!/usr/bin/env python3
"""The Docker Engine of the compose tests (tests/test_compose.py), and its cleanup.

`Engine().start()` uses the engine that is already running, if there is one (DOCKER_HOST, or
an answer on /var/run/docker.sock), and then never stops or reconfigures it. Otherwise it
starts a dockerd of its own (Debian's docker.io, which `make compose-test` installs) that
leaves the host as it found it:

- its data (images, layers) in target/compose/docker, its sockets, pidfile and containerd state
  in a short per-checkout directory in /run (unix socket paths must stay under 108 bytes), its
  own empty daemon.json (not /etc/docker's), its PID kept;
- no default bridge (`--bridge none`: no docker0; compose creates its project network and
  `down` removes it), no iptables or ip6tables rules, no ip_forward or masquerading. Published
  ports then go through docker-proxy, which is also what Docker uses for the host's own
  loopback when it does write iptables rules; containers on one bridge talk to each other
  without forwarding. Docker prints "IPv4 forwarding is disabled. Networking will not work":
  that is about leaving the machine, which nothing here needs (and cannot do: no network).

`stop()` stops that dockerd by its PID (SIGTERM; SIGKILL to it and to its leftover children
after 30 s), unmounts whatever is left under its directories, deletes network links it created
and puts back sysctls it changed, removes its /run directory, and returns how the host differs
from before the start (iptables-save, ip6tables-save, nft ruleset, network links, forwarding
and bridge-netfilter sysctls, mounts): the tests require no difference.

`python3 tests/support/dockerd.py clean` (from `make clean`): stops a dockerd a killed test run
left behind, removes the images the tests built from an engine that was already running
(label rocketchat-ratelimit.test=1; never pushed anywhere), and deletes target/compose.
Standard library only: it runs after the virtualenv is gone.
"""

import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / "target" / "compose"
DATA_ROOT = STATE / "docker"
EXEC_ROOT = Path("/run") / ("rcrl-docker-" + hashlib.sha256(str(ROOT).encode()).hexdigest()[:10])
SOCKET = EXEC_ROOT / "docker.sock"
PIDFILE = EXEC_ROOT / "dockerd.pid"
LOG = STATE / "dockerd.log"
LOCK = STATE / "engine.lock"
DAEMON_JSON = STATE / "daemon.json"
DEFAULT_SOCKET = Path("/var/run/docker.sock")
LABEL = "rocketchat-ratelimit.test"
SYSCTLS = ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/ipv6/conf/default/forwarding",
           "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables"]
# Names of the links a dockerd creates: its bridges and the host ends of container veth pairs.
DOCKER_LINK = re.compile(r"^(br-[0-9a-f]{12}|docker\d+|veth[0-9a-f]{7})$")


def ping(path, timeout=1.0):
    """True when a Docker Engine answers GET /_ping on the unix socket `path`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        return answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n", 1)[0]
    except OSError:
        return False


def host_state():
    """What a dockerd could change on the host, normalised (no packet counters, no dates)."""
    state = {}
    for cmd in (["iptables-save"], ["ip6tables-save"], ["nft", "list", "ruleset"]):
        if shutil.which(cmd[0]):
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            lines = [re.sub(r"\[\d+:\d+\]|counter packets \d+ bytes \d+", "", line)
                     for line in out.splitlines() if not line.startswith("#")]
            state[" ".join(cmd)] = lines
    state["links"] = sorted(os.listdir("/sys/class/net"))
    for name in SYSCTLS:
        path = Path("/proc/sys") / name
        if path.exists():
            state[name] = path.read_text().strip()
    state["mounts"] = our_mounts()
    return state


def differences(before, after):
    out = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            out.append(f"{key}: before {before.get(key)!r}, after {after.get(key)!r}")
    return out


def our_mounts():
    """Mount points under our data root or exec root, deepest first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == str(d) or point.startswith(str(d) + "/") for d in (DATA_ROOT, EXEC_ROOT)):
            found.append(point)
    return sorted(found, key=len, reverse=True)


def proc_cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def ours(pid):
    """Processes of our dockerd: dockerd, its containerd and the container shims all name our
    exec root on their command line."""
    return str(EXEC_ROOT) in proc_cmdline(pid)


def alive(pid):
    """Running (a zombie is not: it only waits for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def kill(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_dockerd(pid, proc=None):
    """SIGTERM to our dockerd (it stops its containers, containerd and docker-proxies), then
    SIGKILL to it and to whatever of it is left, each by PID."""
    family = descendants(pid) + [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if ours(p)]
    kill(pid, signal.SIGTERM)
    if proc is not None:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    else:
        wait_gone([pid], 30)
    left = [p for p in set(family + [pid]) if alive(p)]
    for p in left:
        kill(p, signal.SIGKILL)
    if proc is not None:
        proc.wait()
    wait_gone(left, 10)
    for point in our_mounts():
        subprocess.run(["umount", "-l", point], capture_output=True)
    delete_our_bridges()


def delete_our_bridges():
    """A dockerd keeps the bridges of its networks when it stops (it reuses them when it starts
    again): those of ours go, e.g. what a killed test run left behind."""
    for name in sorted(our_bridges() & set(os.listdir("/sys/class/net"))):
        subprocess.run(["ip", "link", "delete", name], capture_output=True)


def our_bridges():
    """The bridge names our dockerd's network store has held (br-<network id>)."""
    try:
        db = (DATA_ROOT / "network" / "files" / "local-kv.db").read_bytes()
    except OSError:
        return set()
    return {m.decode() for m in re.findall(rb'"BridgeName":"(br-[0-9a-f]{12})"', db)}


def take_lock(timeout):
    """One compose test run at a time per checkout (they share the engine, the compose project
    and its published ports). The kernel drops the lock when its holder dies, so a dockerd found
    running while we hold it was left by a killed run."""
    STATE.mkdir(parents=True, exist_ok=True)
    f = open(LOCK, "w")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.close()
                return None
            time.sleep(0.5)


def leftover_pid():
    """The PID of a dockerd of ours still running (a test run that was killed)."""
    try:
        pid = int(PIDFILE.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) and ours(pid) and "dockerd" in proc_cmdline(pid) else None


class Engine:
    def __init__(self):
        self.own = False
        self.proc = None
        self.before = None
        self.stopped = False
        self.lock = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}

    def start(self, timeout=60, lock_timeout=900):
        """Returns self once an engine answers; raises AssertionError (after cleaning up) when
        none can be had."""
        self.lock = take_lock(lock_timeout)
        if self.lock is None:
            raise AssertionError(f"another compose test run of this checkout holds {LOCK}")
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout):
        if os.environ.get("DOCKER_HOST") or ping(DEFAULT_SOCKET):
            # Someone's engine: used as it is, never stopped or reconfigured.
            self.describe = f"the running engine at {os.environ.get('DOCKER_HOST') or DEFAULT_SOCKET}"
            return self
        dockerd = shutil.which("dockerd")
        if not dockerd:
            raise AssertionError("no Docker Engine running and no dockerd: run `make compose-test`, "
                                 "which installs Debian's docker.io")
        if (pid := leftover_pid()) is not None:
            stop_dockerd(pid)
        delete_our_bridges()
        self.before = host_state()
        STATE.mkdir(parents=True, exist_ok=True)
        EXEC_ROOT.mkdir(mode=0o700, exist_ok=True)
        DAEMON_JSON.write_text("{}\n")
        self.describe = f"its own dockerd (data {DATA_ROOT}, sockets {EXEC_ROOT})"
        self.env.pop("DOCKER_CONTEXT", None)
        self.env["DOCKER_HOST"] = f"unix://{SOCKET}"
        self.own = True
        with open(LOG, "ab") as log:
            self.proc = subprocess.Popen(
                [dockerd, "--config-file", str(DAEMON_JSON), "--data-root", str(DATA_ROOT),
                 "--exec-root", str(EXEC_ROOT), "--pidfile", str(PIDFILE), "--host", f"unix://{SOCKET}",
                 "--bridge", "none", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
                 "--ip-masq=false"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # Ctrl-C on make does not reach it: stop() does the stopping
        deadline = time.monotonic() + timeout
        while not ping(SOCKET):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "did not answer"
                raise AssertionError(f"dockerd {why} (log {LOG}):\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def log_tail(self, lines=30):
        try:
            return "\n".join(LOG.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        """Stops our dockerd and undoes what it did; returns how the host still differs from
        before the start (nothing, when all went well). An engine we did not start is left alone."""
        if self.stopped:
            return []
        self.stopped = True
        try:
            if not self.own:
                return []
            if self.proc is None:  # dockerd never started
                shutil.rmtree(EXEC_ROOT, ignore_errors=True)
                return differences(self.before, host_state())
            stop_dockerd(self.proc.pid, self.proc)
            after = host_state()
            for name in sorted(set(after["links"]) - set(self.before["links"])):
                if DOCKER_LINK.match(name):
                    subprocess.run(["ip", "link", "delete", name], capture_output=True)
            for name in SYSCTLS:
                if name in self.before and after.get(name) != self.before[name]:
                    (Path("/proc/sys") / name).write_text(self.before[name] + "\n")
            shutil.rmtree(EXEC_ROOT, ignore_errors=True)
            return differences(self.before, host_state())
        finally:
            self.lock.close()

    def running(self):
        return self.proc is not None and self.proc.poll() is None


def clean():
    """`make clean`: our leftover dockerd, our images on a running engine, target/compose."""
    if take_lock(0) is None:
        sys.exit(f"a compose test run is using {STATE}: left as it is")
    if (pid := leftover_pid()) is not None:
        print(f"stopping dockerd {pid} left by a test run")
        stop_dockerd(pid)
    shutil.rmtree(EXEC_ROOT, ignore_errors=True)
    if shutil.which("docker") and (os.environ.get("DOCKER_HOST") or ping(DEFAULT_SOCKET)):
        ids = subprocess.run(["docker", "image", "ls", "-q", "--filter", f"label={LABEL}=1"],
                             capture_output=True, text=True).stdout.split()
        if ids:
            subprocess.run(["docker", "image", "rm", "-f", *sorted(set(ids))], check=False)
    for point in our_mounts():
        subprocess.run(["umount", "-l", point], capture_output=True)
    shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["clean"]:
        sys.exit(f"usage: {sys.argv[0]} clean")
    clean()
