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


# File order: `--dist loadfile` hands whole files to the workers; pytest-xdist (3.x) queues them by their number of
# tests, most first (so a file of few long tests, like test_pipeline_training.py, runs last). Forcing the slowest
# files to the front instead (collection order under --no-loadscope-reorder) was not faster on 2 cores (18 min
# 35 s at 2c861f3, against 14 min 36 s for xdist's own order at 18480ce earlier the same evening; the machine's
# speed varied that evening, so the comparison is weak), so the order is left to xdist.


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
