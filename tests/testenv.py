"""The XLA flags of the test session, and the environment a subprocess of a test gets.

Tests compile at XLA's lowest backend optimization level: the suite runs tiny shapes, so LLVM's optimisation of
the generated CPU code is most of each compilation and buys nothing back (a pipeline test on 8 fake devices:
51 s -> 30 s). The HLO the tests check, and what each program computes, are the same at every level; the
benchmarks and the README's commands run at XLA's default level. Set DSV3_TEST_XLA_OPT=1 to test at the default.
"""
import os

FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                if os.environ.get("DSV3_TEST_XLA_OPT", "0") == "0" else "")
FAKE_DEVICES = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process: the inherited flags without any fake device count, the fast-compile flags,
    and `devices` fake CPU devices when given."""
    keep = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(FAKE_DEVICES)]
    keep += [f for f in FAST_COMPILE.split() if f not in keep]
    if devices is not None:
        keep.append(f"{FAKE_DEVICES}={devices}")
    return " ".join(keep)


def one_device_env(**extra) -> dict:
    """The environment of a subprocess run the way a user's shell runs it: JAX on the CPU with one device (the
    session's fake devices removed), keeping the fast-compile flags and the session's compilation cache."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    env.update(extra)
    return env
