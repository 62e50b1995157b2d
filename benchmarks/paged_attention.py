"""Decode attention over the paged latent cache: the Pallas kernel against the jnp gather read
(dsv3_jax/infer/paged_attention.py) at DeepSeek-V3's attention sizes (128 heads, R 512, dr 64, bf16 cache,
pages of 64), one query token per row, per batch size and context length.

    python benchmarks/paged_attention.py [--batch 1,16,64] [--context 1024,4096] [--iters 20] [--output_json F]

Per case it prints the median milliseconds of each implementation, the kernel's speed-up, the bytes of
cache each step must read and the bandwidth the kernel reaches (GB/s), and the kernel's max error against
the jnp read. This is the measurement that decides `runtime.paged_attention_impl('auto')`.

Without an accelerator the kernel runs in interpret mode, which times Python, not a kernel: the script
then runs one small case (4 heads, R 64), checks the two reads agree, prints the timings for the record and
says that they mean nothing for speed.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax import runtime  # noqa: E402
from dsv3_jax.infer.paged_attention import paged_attention  # noqa: E402


def case(B, context, *, N, R, dr, G, layers, dtype, iters, seed=0):
    rng = np.random.default_rng(seed)
    M = -(-context // G)
    P = B * M + 1
    table = jnp.asarray(1 + rng.permutation(B * M).reshape(B, M), jnp.int32)  # scattered pages
    positions = jnp.asarray(rng.integers(context // 2, context, size=(B, 1)), jnp.int32)
    arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)  # noqa: E731
    qdt = jnp.float32 if runtime.platform() == "cpu" else dtype
    q_abs, q_pe = arr(B, 1, N, R).astype(qdt), arr(B, 1, N, dr).astype(qdt)
    c, pe = arr(layers, P, G, R), arr(layers, P, G, dr)
    layer = jnp.asarray(layers - 1, jnp.int32)
    fns = {impl: jax.jit(lambda *a, impl=impl: paged_attention(*a[:-1], layer=a[-1], scale=0.07, impl=impl))
           for impl in ("jnp", "pallas")}
    args = (q_abs, q_pe, c, pe, table, positions, layer)
    ref = fns["jnp"](*args)
    err = float(jnp.max(jnp.abs(fns["pallas"](*args) - ref)) / jnp.max(jnp.abs(ref)))
    t = {impl: C.timed(f, *args, reps=iters) for impl, f in fns.items()}
    read = int(jnp.sum(positions + 1)) * (R + dr) * jnp.dtype(dtype).itemsize
    return {"batch": B, "context": context, "jnp_ms": t["jnp"] * 1e3, "pallas_ms": t["pallas"] * 1e3,
            "speedup": t["jnp"] / t["pallas"], "cache_mb_read": read / 1e6,
            "pallas_gb_per_s": read / t["pallas"] / 1e9, "max_rel_err": err}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,16,64")
    p.add_argument("--context", default="1024,4096")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--output_json", default=None)
    args = p.parse_args()
    on_cpu = runtime.platform() == "cpu"
    if on_cpu:
        dims = dict(N=4, R=64, dr=16, G=16, layers=2, dtype=jnp.float32)
        cases = [(2, 64)]
        print("no accelerator: the kernel runs in interpret mode; one small case checks agreement, its timings "
              "are not kernel speed")
    else:
        dims = dict(N=128, R=512, dr=64, G=64, layers=2, dtype=jnp.bfloat16)
        cases = [(int(b), int(c)) for b in args.batch.split(",") for c in args.context.split(",")]
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {dims}", flush=True)
    rows = [case(B, ctx, iters=args.iters if not on_cpu else 3, **dims) for B, ctx in cases]
    print(f"{'batch':>5} {'context':>7} {'jnp ms':>9} {'pallas ms':>9} {'speed-up':>8} {'MB read':>8} "
          f"{'GB/s':>7} {'max rel err':>11}")
    for r in rows:
        print(f"{r['batch']:>5} {r['context']:>7} {r['jnp_ms']:>9.3f} {r['pallas_ms']:>9.3f} {r['speedup']:>7.2f}x "
              f"{r['cache_mb_read']:>8.2f} {r['pallas_gb_per_s']:>7.1f} {r['max_rel_err']:>11.2e}")
    tol = 1e-4 if on_cpu else 2e-2
    bad = [r for r in rows if not r["max_rel_err"] < tol]
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=1)
    if bad:
        sys.exit(f"paged attention kernel disagrees with the jnp read beyond {tol}: {bad}")


if __name__ == "__main__":
    main()
