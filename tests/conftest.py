"""Test setup: 8 fake CPU devices (set before jax is imported) compiled at XLA's lowest optimization level
(testenv.py), float32 matmul precision, and one persistent compilation cache for the whole session.

The cache: many tests compile the same programs (the tiny model's train step in every `train.py` subprocess of
test_bad_inputs, the engine's steps in infer.py / serve.py runs, ...). XLA's persistent cache (a directory keyed by
the program, the compile options and the XLA flags) lets every process after the first load the executable
instead of compiling it again; what runs is the same executable, so no test's meaning changes. The directory is
made once per session by the process that loads this file first (pytest's controller under xdist) and inherited
by the workers and every subprocess through the environment; that process removes it at the end. With a size
limit JAX guards the directory with a file lock, so concurrent writers and readers never see a torn entry.
Set DSV3_TEST_COMPILATION_CACHE=0 to run without it.
"""
import os
import shutil
import tempfile

from testenv import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(devices=8)  # (and the fast-compile flags: see testenv.py)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWNER = None
if os.environ.get("DSV3_TEST_COMPILATION_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWNER = tempfile.mkdtemp(prefix="dsv3-jax-test-compilation-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWNER, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                      JAX_COMPILATION_CACHE_MAX_SIZE=str(8 * 1024 ** 3))  # a limit turns on JAX's file lock

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if _OWNER is not None:
        shutil.rmtree(_OWNER, ignore_errors=True)
