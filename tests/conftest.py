"""Test setup: 8 fake CPU devices (set before jax is imported) compiled at XLA's lowest optimization level
(testenv.py), float32 matmul precision, and one persistent compilation cache for the whole session.

The cache: many tests compile the same programs (the tiny model's train step in every `train.py` subprocess of
test_bad_inputs, the engine's steps in infer.py / serve.py runs, ...). XLA's persistent cache (a directory keyed by
the program, the compile options and the XLA flags) lets every process after the first load the executable
instead of compiling it again; what runs is the same executable, so no test's meaning changes. The directory is
made once per session by the process that loads this file first (pytest's controller under xdist) and inherited
by the workers and every subprocess through the environment; that process removes it at the end. Every
compilation is kept, the eager ops' small ones too (the model's initialisation on a mesh is a few hundred of them,
the same in many tests). The cache has no size limit: with one, JAX re-reads the whole directory on every write
(thousands of entries here) to find what to evict. Without a limit JAX takes no lock, so a process could read an
entry while another process writes the same one; JAX then warns and compiles instead, so nothing wrong is loaded.
Set DSV3_TEST_COMPILATION_CACHE=0 to run without it.
"""
import gc
import os
import shutil
import tempfile

import pytest
from testenv import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(devices=8)  # (and the fast-compile flags: see testenv.py)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWNER = None
if os.environ.get("DSV3_TEST_COMPILATION_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWNER = tempfile.mkdtemp(prefix="dsv3-jax-test-compilation-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWNER, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _OWNER is not None:
        shutil.rmtree(_OWNER, ignore_errors=True)


# Work order under `--dist loadfile`: pytest-xdist (3.x) hands whole files to the workers and queues them by their
# number of tests, most first, so a file of a few long tests (test_pipeline_training.py: 3 tests, ~4 min) ran last,
# alone on one worker while the other idled (the last 3% of the tests took 5 of 26 minutes at 715ee60). Instead the
# queue is longest first, by each file's seconds (SECONDS: wall seconds per file from benchmarks/suite_profile.py
# over the whole suite on 2 busy cores; files not listed count 1.5 s per test), and the notebooks are one unit each
# (their tests share no fixture), so that the short files fill the end of the run on both workers.
SECONDS = {  # per file, or per test where the file's tests are separate units (ONE_UNIT_PER_TEST); at af07418
    "tests/test_notebooks.py::test_notebook_runs[06_chat_lora]": 167,
    "tests/test_notebooks.py::test_notebook_runs[05_mtp_speculative]": 101,
    "tests/test_notebooks.py::test_notebook_runs[03_routing_balance]": 92,
    "tests/test_notebooks.py::test_notebook_runs[02_mla_cache]": 22,
    "tests/test_notebooks.py::test_notebook_runs[01_tour]": 16,
    "tests/test_notebooks.py::test_notebook_runs[04_fp8_blocks]": 15,
    "tests/test_bad_inputs.py": 298, "tests/test_pipeline_schedules.py": 280, "tests/test_engine.py": 268,
    "tests/test_pipeline_training.py": 266, "tests/test_train.py": 213, "tests/test_parallel.py": 202,
    "tests/test_serve.py": 157, "tests/test_dsa_training.py": 145, "tests/test_lora.py": 143,
    "tests/test_fp8_resident.py": 126, "tests/test_distributed.py": 107, "tests/test_packing.py": 94,
    "tests/test_dsa.py": 88, "tests/test_prepare.py": 64, "tests/test_fp8.py": 58, "tests/test_structured.py": 53,
    "tests/test_interop.py": 43, "tests/test_chat_data.py": 36, "tests/test_infer.py": 33,
    "tests/test_paged_attention.py": 29, "tests/test_memory_plan.py": 23,
}
ONE_UNIT_PER_TEST = ("tests/test_notebooks.py",)


@pytest.hookimpl(optionalhook=True)  # (an xdist hook: without pytest-xdist installed, pytest would refuse it)
def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LongestFirst(LoadFileScheduling):
        def _split_scope(self, nodeid):
            file = nodeid.split("::", 1)[0]
            return nodeid if file in ONE_UNIT_PER_TEST else super()._split_scope(nodeid)

        def schedule(self):
            collections = list(self.registered_collections.values())
            if self.collection is None and all(c == collections[0] for c in collections):  # (else xdist reports)
                ids = collections[0]
                tests = {}
                for nodeid in ids:
                    tests.setdefault(self._split_scope(nodeid), []).append(nodeid)
                cost = {s: SECONDS.get(s, 1.5 * len(t)) for s, t in tests.items()}
                order = [n for s in sorted(tests, key=lambda s: -cost[s]) for n in tests[s]]
                for node in self.registered_collections:
                    self.registered_collections[node] = order
                self.config.option.loadscopereorder = False  # (keep this order)
            super().schedule()

    return LongestFirst(config, log)


# Memory maps: every compiled XLA CPU program holds mmaps of its code, and jit's caches keep every program a test
# file compiled. A worker that runs many files then reaches the kernel's limit (vm.max_map_count, 65,530 here),
# mmap fails inside XLA, and the worker aborts in a loop (seen at a13de7f: the last file of a worker, 65,532 maps).
# So each test file's programs are dropped when the file is done; the persistent cache above makes any later
# compilation of the same program a load from disk.
@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs_after_each_file():
    yield
    gc.collect()
    jax.clear_caches()
    gc.collect()
