"""CPU train-step speed of each routed-expert layout ('blocks', 'ragged', 'dense') on the tiny config.

    python benchmarks/moe_paths.py [--batch 16 --seq 128 --steps 5]

Every layout computes the same function (tests/test_moe.py checks them against each other); this
prints the wall time of a full train step (forward, backward, AdamW) for each, in one process, and the
ratio to the fastest. Absolute numbers depend on the machine; compare the ratios.
"""
import argparse
import importlib.util
import os
import time

import jax
import jax.numpy as jnp

from dsv3_jax import runtime
from dsv3_jax.config import ModelConfig
from dsv3_jax.train.loop import init_state
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.train.step import make_train_step


def tiny_config():
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def time_step(cfg: ModelConfig, rt, batch: int, seq: int, steps: int) -> float:
    tx, schedule = make_optimizer(peak_lr=1e-3, warmup_steps=1, constant_steps=10, decay_steps=10)
    graphdef, state = init_state(cfg, tx, seed=0, rt=rt)
    step = make_train_step(graphdef, tx, schedule)
    window = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, cfg.vocab_size)
    args = (window, jnp.float32(0.3), jnp.float32(1e-4), jnp.float32(1e-3))
    state, m = step(state, *args)  # compile
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, *args)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--impls", default="blocks,ragged,dense")
    a = p.parse_args()
    rows = []
    config = tiny_config()
    cfg = ModelConfig.from_dict(config.model)
    for impl in a.impls.split(","):
        config.model.moe_impl = impl
        rows.append((impl, time_step(cfg, runtime.from_config(config), a.batch, a.seq, a.steps)))
    best = min(t for _, t in rows)
    print(f"backend={runtime.platform()} devices={jax.device_count()} batch={a.batch} seq={a.seq}")
    print(f"{'moe_impl':<10}{'s/step':>10}{'tokens/s':>12}{'x fastest':>11}")
    for impl, t in rows:
        print(f"{impl:<10}{t:>10.3f}{a.batch * a.seq / t:>12.0f}{t / best:>11.2f}")


if __name__ == "__main__":
    main()
