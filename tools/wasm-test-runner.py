#!/usr/bin/env python3
"""cargo's runner for wasm32-wasip1 test binaries: libtest inside wasmtime, surviving an abort.

    CARGO_TARGET_WASM32_WASIP1_RUNNER="python tools/wasm-test-runner.py" \\
        cargo test --lib --target wasm32-wasip1 [-- libtest args]

cargo calls it as `wasm-test-runner.py TEST.wasm [ARGS...]`. It runs the module's `_start` under
WASI (argv, the environment, stdout and stderr passed through; no directory preopened) and
exits with the module's exit code. The proxy-wasm imports of the library (`env.proxy_*`) are
defined as traps: a unit test has no Envoy, and one that calls the host fails loudly.

wasm32-wasip1 builds with panic=abort: the first failing test aborts the whole module (a wasm
trap) and libtest's summary never comes. So the runner runs libtest with `--test-threads=1
--nocapture`, under which libtest writes `test NAME ... ` before it runs NAME and the panic
message reaches stderr. When the module traps, the test that was running is reported as
`test NAME ... FAILED (trapped)` with its panic message, and libtest runs again on exactly the
tests not yet run (`--exact` plus their names, from `--list` with the caller's filters), until
a run completes. The runner then prints the failures and one `test result:` line in libtest's
format for all the runs together, and exits 101 if any test failed.

`--list`, `--help` and `--bench` runs are passed through unchanged.
"""

import os
import re
import sys
import time

import wasmtime

# libtest's options that take a value (as `--opt value` or `--opt=value`); anything else that
# does not start with '-' is a test-name filter.
VALUE_OPTIONS = {"--logfile", "--test-threads", "--skip", "--color", "--format", "-Z",
                 "--shuffle-seed"}
PASS_THROUGH = {"--list", "--help", "-h", "--bench"}

START = re.compile(r"^test (\S+) \.\.\. ")
RESULT = re.compile(r"^(ok|FAILED|ignored(?:, .*)?)$")


def split_args(args):
    """(options, filters, skips): libtest's own options, positional filters, --skip values."""
    options, filters, skips = [], [], []
    i = 0
    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if name in VALUE_OPTIONS:
            value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in a else 2
            (skips if name == "--skip" else options).append((name, value))
        elif a.startswith("-"):
            options.append((a, None))
            i += 1
        else:
            filters.append(a)
            i += 1
    return options, filters, skips


def flatten(options):
    out = []
    for name, value in options:
        out += [name] if value is None else [name, value]
    return out


class Run:
    """One run of the module; tees its output and follows libtest's progress lines."""

    def __init__(self, engine, module, argv, hide_summary):
        self.hide_summary = hide_summary
        self.current = None  # the test libtest announced and has not finished
        self.current_stderr = []  # what it wrote to stderr so far
        self.results = {}  # name -> "ok" | "FAILED" | "ignored..."
        self.messages = {}  # name -> what a test that FAILED without trapping wrote to stderr
        self.line = ""  # stdout's unfinished line
        self.shown = 0  # how much of it was already passed on
        store = wasmtime.Store(engine)
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv
        wasi.inherit_env()
        wasi.stdout_custom = self.on_stdout
        wasi.stderr_custom = self.on_stderr
        store.set_wasi(wasi)
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        linker.define_unknown_imports_as_traps(module)
        self.trap = None
        self.code = 0
        try:
            instance = linker.instantiate(store, module)
            instance.exports(store)["_start"](store)
        except wasmtime.ExitTrap as e:
            self.code = e.code
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            self.trap = str(e)
        finally:
            # Drop the store (and its output callbacks) now, while Python can still run them.
            store.close()
        self.flush()

    # --- output --------------------------------------------------------------------------
    def on_stdout(self, data):
        self.line += data.decode("utf-8", errors="replace")
        while "\n" in self.line:
            line, self.line = self.line.split("\n", 1)
            if not (self.hide_summary and line.startswith("test result: ")):
                self.write(line[self.shown:] + "\n")
            self.shown = 0
            self.on_line(line)
        # `test NAME ... ` comes before NAME runs: show it now (a test may hang or trap).
        m = START.match(self.line)
        if m and self.current != m.group(1):
            self.start(m.group(1))
        if not "test result: ".startswith(self.line[:13]) or not self.hide_summary:
            self.write(self.line[self.shown:])
            self.shown = len(self.line)

    def on_stderr(self, data):
        self.current_stderr.append(data)
        sys.stdout.flush()
        sys.stderr.buffer.write(data)
        sys.stderr.flush()

    def write(self, text):
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    def flush(self):
        if self.line[self.shown:]:
            self.write(self.line[self.shown:])
        if self.line:
            self.write("\n")

    # --- libtest's progress --------------------------------------------------------------------
    def start(self, name):
        self.current = name
        self.current_stderr = []

    def finish(self, name, result):
        self.results[name] = result
        if result == "FAILED":
            self.messages[name] = self.panic_message()
        self.current = None

    def on_line(self, line):
        m = START.match(line)
        if m:
            rest = line[m.end():]
            if RESULT.match(rest):
                self.finish(m.group(1), rest)
            elif self.current != m.group(1):
                self.start(m.group(1))  # its own output follows on the same line
            return
        if self.current and RESULT.match(line):
            self.finish(self.current, line)

    def panic_message(self):
        text = b"".join(self.current_stderr).decode("utf-8", errors="replace")
        lines = [l for l in text.splitlines()
                 if l.strip() and not l.startswith("note: ") and l != "stack backtrace:"]
        return "\n".join(lines)


def list_tests(engine, module, wasm, args):
    """The names libtest would run with these arguments (`--list`)."""
    out = []
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = [wasm] + args + ["--list"]
    wasi.inherit_env()
    wasi.stdout_custom = out.append
    wasi.inherit_stderr()
    store.set_wasi(wasi)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.define_unknown_imports_as_traps(module)
    try:
        linker.instantiate(store, module).exports(store)["_start"](store)
    except wasmtime.ExitTrap as e:
        if e.code:
            raise SystemExit(f"wasm-test-runner: `--list` failed with exit code {e.code}")
    finally:
        store.close()
    names = []
    for line in b"".join(out).decode("utf-8", errors="replace").splitlines():
        m = re.match(r"^(.*): (test|bench)$", line)
        if m:
            names.append(m.group(1))
    return names


def leave(code):
    """Exits without Python's teardown: wasmtime may still call back into the output callbacks
    of a trapped store from its own threads, which panics once the interpreter is finalizing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    wasm, args = sys.argv[1], sys.argv[2:]
    began = time.monotonic()
    engine = wasmtime.Engine()
    module = wasmtime.Module.from_file(engine, wasm)

    if PASS_THROUGH & {a.split("=", 1)[0] for a in args}:
        run = Run(engine, module, [wasm] + args, hide_summary=False)
        if run.trap:
            print(f"wasm-test-runner: trap: {run.trap}", file=sys.stderr)
            leave(101)
        leave(run.code)

    options, filters, skips = split_args(args)
    # One test at a time, announced before it runs; panic messages straight to stderr.
    options = [o for o in options if o[0] not in ("--test-threads", "--nocapture", "--no-capture")]
    forced = ["--test-threads=1", "--nocapture"]
    first = [wasm] + flatten(options) + flatten(skips) + filters + forced
    run = Run(engine, module, first, hide_summary=False)
    if run.trap is None:
        leave(run.code)  # libtest finished and summed up itself

    # From here on, runs after a trap: collect every result, and sum up at the end.
    results = {}  # name -> "ok" | "FAILED" | "ignored..." | "trapped"
    messages = {}  # name -> panic message
    selected = None
    code_seen = 0
    while True:
        results.update(run.results)
        messages.update(run.messages)
        if run.trap is not None:
            name = run.current
            if name is None:
                print(f"\nwasm-test-runner: the module trapped outside any test: {run.trap}",
                      file=sys.stderr)
                leave(101)
            results[name] = "trapped"
            messages[name] = run.panic_message() or run.trap.splitlines()[0]
            print(f"test {name} ... FAILED (trapped)")
            sys.stdout.flush()
        else:
            code_seen = run.code
            break
        if selected is None:
            selected = list_tests(engine, module, wasm, flatten(options) + flatten(skips) + filters)
            total = len(list_tests(engine, module, wasm, []))
        remaining = [n for n in selected if n not in results]
        if not remaining:
            break
        if name not in selected:  # would run the same tests again: give up rather than loop
            print(f"wasm-test-runner: {name} is not among the tests `--list` gives", file=sys.stderr)
            leave(101)
        print(f"\nwasm-test-runner: {name} aborted the module (panic=abort); running the "
              f"{len(remaining)} tests not yet run")
        sys.stdout.flush()
        rerun_options = [o for o in options if o[0] != "--exact"]
        argv = [wasm] + flatten(rerun_options) + ["--exact"] + remaining + forced
        run = Run(engine, module, argv, hide_summary=True)

    passed = sum(1 for r in results.values() if r == "ok")
    ignored = sum(1 for r in results.values() if r.startswith("ignored"))
    failed = sorted(n for n, r in results.items() if r in ("FAILED", "trapped"))
    if code_seen and not failed:
        failed = ["(the last run exited with code %d)" % code_seen]
    print("\nfailures:\n")
    for name in failed:
        if messages.get(name):
            how = " (trapped)" if results.get(name) == "trapped" else ""
            print(f"---- {name}{how} ----\n{messages[name]}\n")
    print("failures:")
    for name in failed:
        print(f"    {name}")
    filtered = max(0, total - len(selected)) if selected is not None else 0
    print(f"\ntest result: FAILED. {passed} passed; {len(failed)} failed; {ignored} ignored; "
          f"0 measured; {filtered} filtered out; finished in {time.monotonic() - began:.2f}s\n")
    leave(101)


if __name__ == "__main__":
    main()
