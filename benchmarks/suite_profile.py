"""Where the test suite's time goes: a pytest plugin that records, per test, wall time, the process's CPU time
(and its finished subprocesses'), and JAX's own durations (XLA compilations, lowering to MLIR, tracing), with
how many of each; then a table per file.

    DSV3_SUITE_PROFILE=/tmp/prof PYTHONPATH=benchmarks python -m pytest -n auto --dist loadfile -p suite_profile
    python benchmarks/suite_profile.py /tmp/prof

Each test process (every xdist worker) writes one JSON file into the directory when its session ends. JAX's
durations are wall-clock (with 2 workers on 2 cores they include waiting for the other worker), so they can add
up to more than the CPU time. Notebook kernels and servers started by a test are not its children in the sense of
`os.times` unless the test waits for them.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import sys
import time

EVENTS = {"/jax/core/compile/backend_compile_duration": "compile",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load"}
_totals: collections.Counter = collections.Counter()
_rows: list = []
_programs: dict = collections.defaultdict(collections.Counter)  # compiled function name -> n, seconds (per process)


def pytest_configure(config):
    from jax import monitoring

    def on_duration(event, duration, fun_name=None, **_):
        if event in EVENTS:
            _totals[EVENTS[event]] += duration
            _totals["n_" + EVENTS[event]] += 1
        if EVENTS.get(event) == "compile":
            _programs[str(fun_name)].update(n=1, seconds=duration)

    monitoring.register_event_duration_secs_listener(on_duration)


def _hookwrapper(fn):
    import pytest

    return pytest.hookimpl(hookwrapper=True)(fn)


@_hookwrapper
def pytest_runtest_protocol(item, nextitem):
    before, t0, c0 = dict(_totals), time.time(), os.times()
    yield
    c1 = os.times()
    row = {"test": item.nodeid, "wall": time.time() - t0, "cpu": c1.user - c0.user + c1.system - c0.system,
           "child_cpu": c1.children_user - c0.children_user + c1.children_system - c0.children_system}
    row.update({k: v - before.get(k, 0) for k, v in _totals.items()})
    _rows.append(row)


def pytest_sessionfinish(session):
    out = os.environ.get("DSV3_SUITE_PROFILE")
    if out and _rows:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rows-{os.getpid()}.json"), "w") as f:
            json.dump(_rows, f)
        with open(os.path.join(out, f"programs-{os.getpid()}.json"), "w") as f:
            json.dump({k: dict(v) for k, v in _programs.items()}, f)


COLUMNS = ("wall", "cpu", "child_cpu", "compile", "n_compile", "lower", "trace", "cache_load", "n_cache_load")


def table(directory: str, top: int = 30) -> str:
    rows = [r for path in glob.glob(os.path.join(directory, "rows-*.json")) for r in json.load(open(path))]
    per_file: dict = collections.defaultdict(collections.Counter)
    for r in rows:
        per_file[r["test"].split("::")[0]].update({k: r.get(k, 0) for k in COLUMNS})
    total = collections.Counter()
    for c in per_file.values():
        total.update(c)
    lines = [f"{len(rows)} tests; seconds (n_: counts)", "| file | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    order = sorted(per_file.items(), key=lambda kv: -(kv[1]["cpu"] + kv[1]["child_cpu"]))
    for name, c in order[:top] + [("all", total)]:
        lines.append(f"| {os.path.basename(name)} | " + " | ".join(
            f"{c[k]:.0f}" if k.startswith("n_") else f"{c[k]:.1f}" for k in COLUMNS) + " |")
    return "\n".join(lines)


def programs(directory: str, top: int = 25) -> str:
    """The compiled functions that took the most XLA compile time, over all test processes (a name counts every
    program compiled under it: each shape, sharding and static argument is one more)."""
    total: dict = collections.defaultdict(collections.Counter)
    for path in glob.glob(os.path.join(directory, "programs-*.json")):
        for name, c in json.load(open(path)).items():
            total[name].update(c)
    lines = ["| compiled function | programs | compile seconds |", "|---|---|---|"]
    for name, c in sorted(total.items(), key=lambda kv: -kv[1]["seconds"])[:top]:
        lines.append(f"| {name} | {c['n']} | {c['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30))
    if glob.glob(os.path.join(sys.argv[1], "programs-*.json")):
        print()
        print(programs(sys.argv[1]))
