"""The XLA flags of the test session, and the environment a subprocess of a test gets.

Tests compile at XLA's lowest backend optimization level: the suite runs tiny shapes, so LLVM's optimisation of
the generated CPU code is most of each compilation and buys nothing back (a pipeline test on 8 fake devices:
51 s -> 30 s). Where jaxlib still has them (0.10; 0.12 has only the new ones), XLA:CPU's older loop emitters
are used for fusions: at that level they compile in about half the time and run faster (the tiny config's
train step on one device: compile 8.0-9.6 s -> 4.8-5.1 s, a step 1.3-1.5 s -> 1.0 s; on stage 2 x expert 2 x
data 2: 19 s -> 13 s and 9.5 s -> 6.6 s; at 715ee60). The HLO the tests check, and what each program computes,
are the same at every level and with either emitter (float results can differ in the last bit); the benchmarks
and the README's commands run at XLA's defaults. Set DSV3_TEST_XLA_OPT=1 to test at the defaults.
"""
import os
import subprocess
import sys

FAKE_DEVICES = "--xla_force_host_platform_device_count"
OLD_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _old_emitters() -> str:
    """OLD_EMITTERS if this jaxlib accepts it (an unknown XLA flag aborts the process, so a subprocess asks, once
    per session: the answer is passed on to the workers and subprocesses in DSV3_TEST_OLD_EMITTERS)."""
    if "DSV3_TEST_OLD_EMITTERS" not in os.environ:
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
                               env=dict(os.environ, XLA_FLAGS=OLD_EMITTERS, JAX_PLATFORMS="cpu"))
        os.environ["DSV3_TEST_OLD_EMITTERS"] = "1" if probe.returncode == 0 else "0"
    return OLD_EMITTERS if os.environ["DSV3_TEST_OLD_EMITTERS"] == "1" else ""


FAST_COMPILE = (f"--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true {_old_emitters()}"
                if os.environ.get("DSV3_TEST_XLA_OPT", "0") == "0" else "")


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
