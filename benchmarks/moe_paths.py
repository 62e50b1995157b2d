"""CPU train-step speed of each routed-expert layout on the tiny config: 'blocks' as the resolver runs it on
CPU (its float GEMMs a loop over the blocks that hold rows, `experts.swiglu_block_loop`), 'blocks' with the
batched einsum (the reference form, and what runs elsewhere), 'ragged' and 'dense'.

    python benchmarks/moe_paths.py [--batch 16 --seq 128 --rounds 8] [--impls blocks,blocks_einsum,ragged,dense]
                                   [--mtp 0] [--block 128]

Every layout computes the same function (tests/test_moe.py checks them against numpy and their gradients
against each other). Each layout's full train step (forward, backward, AdamW; MTP off by default, as in
transformers' model) is compiled and run twice first; then the steps are timed round-robin, one step of each
layout per round, the order reversed every other round, so that a machine whose speed drifts (a shared VM) slows
every layout alike. Printed: the median step time, tokens/s, the median over rounds of each layout's step time
over the first layout's in the same round ('vs first': > 1 is slower), and the load average before and after.
"""
import _common as C  # (puts the repository root on sys.path)

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import runtime
from dsv3_jax.config import ModelConfig
from dsv3_jax.train.loop import init_state
from dsv3_jax.train.optim import make_optimizer
from dsv3_jax.train.step import make_train_step

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def layout_runtime(config, impl: str, block: int):
    """The Runtime of row `impl`: 'blocks_einsum' is 'blocks' without the CPU loop."""
    config.model.moe_impl = "blocks" if impl == "blocks_einsum" else impl
    config.model.moe_block_size = block
    rt = runtime.from_config(config)
    return dataclasses.replace(rt, expert_blocks_loop=False) if impl == "blocks_einsum" else rt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8, help="timed steps of each layout, interleaved")
    p.add_argument("--impls", default="blocks,blocks_einsum,ragged,dense")
    p.add_argument("--mtp", type=int, default=0, help="MTP depth (default 0: the network transformers trains)")
    p.add_argument("--block", type=int, default=None, help="moe_block_size (default: the config's)")
    a = p.parse_args()
    watch = C.LoadWatch()
    config = C.load_config(os.path.join(ROOT, "configs", "tiny.py"))
    block = a.block or int(config.model.moe_block_size)
    cfg = ModelConfig.from_dict(config.model).replace(num_nextn_predict_layers=a.mtp)
    tx, schedule = make_optimizer(peak_lr=1e-3, warmup_steps=1, constant_steps=10, decay_steps=10)
    window = jax.random.randint(jax.random.key(0), (a.batch, a.seq + 1), 0, cfg.vocab_size)
    scalars = (jnp.float32(0.3), jnp.float32(1e-4), jnp.float32(1e-3))
    impls = a.impls.split(",")
    runs = {}
    for impl in impls:
        rt = layout_runtime(config, impl, block)
        graphdef, state = init_state(cfg, tx, seed=0, rt=rt)
        step = make_train_step(graphdef, tx, schedule)
        t0 = time.perf_counter()
        for _ in range(2):  # (the first compiles)
            state, m = step(state, window, *scalars)
            jax.block_until_ready(m)
        print(f"{impl}: {rt.describe()}; compile + 2 steps {time.perf_counter() - t0:.1f} s, "
              f"loss {float(m['loss']):.6f}", file=sys.stderr)
        runs[impl] = {"step": step, "state": state, "t": []}
    for r in range(a.rounds):
        for impl in (impls if r % 2 == 0 else impls[::-1]):
            run = runs[impl]
            t = time.perf_counter()
            run["state"], m = run["step"](run["state"], window, *scalars)
            jax.block_until_ready(m)
            run["t"].append(time.perf_counter() - t)
    first = np.asarray(runs[impls[0]]["t"])
    print(f"backend={runtime.platform()} devices={jax.device_count()} batch={a.batch} x seq={a.seq}, MTP depth "
          f"{a.mtp}, blocks of {block}, {a.rounds} interleaved rounds")
    print("| moe layout | ms/step (median) | tokens/s | vs first (paired median) |")
    print("|---|---|---|---|")
    for impl in impls:
        t = np.asarray(runs[impl]["t"])
        print(f"| {impl} | {np.median(t) * 1e3:.1f} | {a.batch * a.seq / np.median(t):,.0f} | "
              f"{np.median(t / first):.3f} |")
    print(watch.line())


if __name__ == "__main__":
    main()
