"""Routed experts' grouped GEMM against a dense GEMM of the same FLOPs, forward and forward + backward, at a
config's expert shapes: `jax.lax.ragged_dot` (the 'ragged' expert layout of dsv3_jax/experts.py) and, on a
GPU, the Mosaic GPU kernels with their backward (the 'mgpu' layout, dsv3_jax/grouped_gemm_mgpu.py).

    python benchmarks/grouped_gemm.py [--config configs/gpu_bench.py] [--tokens 16384] [--json FILE]
    python benchmarks/grouped_gemm.py --smoke          # tiny shapes (CPU: checks the script, not the speed)

Rows R = tokens x top-k routed rows, sorted by expert, E groups. Projections: gate (and up; the same shape)
x [R, D] . w [E, D, F], and down h [R, F] . w [E, F, D]. The dense GEMM multiplies the same x [R, K] by one
[K, N] weight: 2 R K N FLOPs, what the grouped GEMM does. Forward + backward is `jax.vjp` (the forward, then
dx and dw: 3 x the FLOPs). Two loads: 'balanced' (R / E rows per expert) and 'skewed' (sizes proportional to
1 / sqrt(rank), the shape of an unbalanced router early in training). Each timing is the median of --iters
runs after a warm-up, bf16 operands with f32 accumulation (float32 on CPU).

Before timing, every grouped result is checked against a per-expert numpy reference (max relative error
printed), so a fast wrong kernel cannot pass. The ratio column is grouped / dense TFLOP/s; #19's target is
>= 60% forward and backward, met by the better implementation (`min_ratio`: its lowest ratios; each one's in
`min_ratio_by_impl`). An implementation that fails (a kernel the installed jax does not have, a shape its tiles
refuse) is reported under `errors` and the others still run.
"""
from __future__ import annotations

import _common as C

import argparse
import json

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dsv3_jax import runtime  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402


def group_sizes(R: int, E: int, dist: str) -> np.ndarray:
    """Rows per expert summing to R: 'balanced' or 'skewed' (proportional to 1 / sqrt(rank))."""
    if dist == "balanced":
        w = np.ones(E)
    else:
        w = 1.0 / np.sqrt(np.arange(1, E + 1))
    sizes = np.floor(w / w.sum() * R).astype(np.int32)
    sizes[0] += R - sizes.sum()
    return sizes


def reference_error(x, w, sizes, got) -> float:
    """Max |got - ref| / max |ref| against a float64 numpy per-expert product."""
    xs, ws = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ref, start = np.zeros((xs.shape[0], ws.shape[2])), 0
    for e, n in enumerate(sizes):
        ref[start:start + n] = xs[start:start + n] @ ws[e]
        start += n
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


def grouped_fn(impl: str, gs, dtype):
    """x [R, K], w [E, K, N] -> [R, N] in dtype, by `impl` ('ragged': XLA's ragged_dot; 'mgpu': Mosaic GPU)."""
    if impl == "mgpu":
        from dsv3_jax.grouped_gemm_mgpu import grouped_gemm_mgpu

        gemm = grouped_gemm_mgpu()
        return lambda x, w: gemm(x, w, gs).astype(dtype)
    return lambda x, w: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32).astype(dtype)


def bench(R: int, K: int, N: int, E: int, dist: str, dtype, iters: int, impl: str = "ragged") -> list[dict]:
    sizes = group_sizes(R, E, dist)
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (R, K), jnp.float32).astype(dtype)
    w = (jax.random.normal(keys[1], (E, K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    w0 = w[0]
    ct = jax.random.normal(keys[2], (R, N), jnp.float32).astype(dtype)
    gs = jnp.asarray(sizes)

    grouped = grouped_fn(impl, gs, dtype)

    def dense(x, w0):
        return jnp.dot(x, w0, preferred_element_type=jnp.float32).astype(dtype)

    def fwd_bwd(f):
        return jax.jit(lambda a, b, ct: jax.vjp(f, a, b)[1](ct))

    err = reference_error(x, w, sizes, jax.jit(grouped)(x, w))
    flops = 2.0 * R * K * N
    rows = []
    for name, mult, g_fn, d_fn in (("fwd", 1, jax.jit(grouped), jax.jit(dense)),
                                   ("fwd+bwd", 3, fwd_bwd(grouped), fwd_bwd(dense))):
        g_args, d_args = ((x, w), (x, w0)) if name == "fwd" else ((x, w, ct), (x, w0, ct))
        tg, td = C.timed(g_fn, *g_args, reps=iters), C.timed(d_fn, *d_args, reps=iters)
        rows.append({"impl": impl, "R": R, "K": K, "N": N, "E": E, "load": dist, "pass": name, "grouped_ms": tg * 1e3,
                     "dense_ms": td * 1e3, "grouped_tflops": mult * flops / tg / 1e12,
                     "dense_tflops": mult * flops / td / 1e12, "ratio": td / tg, "max_rel_err": err})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="configs/*.py whose expert shapes are used (default gpu_bench)")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (rows = tokens x top-k)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script (CPU)")
    p.add_argument("--json", default="", help="also write the rows to this file")
    p.add_argument("--impls", default="", help="comma-separated grouped GEMMs to time (default: ragged, and mgpu "
                   "on a GPU)")
    a = p.parse_args()

    config = C.load_config(a.config or f"{C.ROOT}/configs/gpu_bench.py")
    cfg = ModelConfig.from_dict(config.model)
    D, F, E, top = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    tokens, iters = a.tokens, a.iters
    if a.smoke:
        D, F, E, top, tokens, iters = 64, 32, 8, 2, 256, 2
    dtype = jnp.bfloat16 if runtime.platform() != "cpu" else jnp.float32
    R = tokens * top
    print(f"backend={runtime.platform()} ({runtime.device_kind()}), {jnp.dtype(dtype).name}; {tokens} tokens x "
          f"top-{top} = {R} rows over {E} experts; D {D}, F {F}; median of {iters}")
    impls = a.impls.split(",") if a.impls else ["ragged"] + (["mgpu"] if runtime.platform() == "gpu" else [])
    rows, errors = [], {}
    for impl in impls:
        try:
            for proj, K, N in (("gate/up", D, F), ("down", F, D)):
                for dist in ("balanced", "skewed"):
                    for r in bench(R, K, N, E, dist, dtype, iters, impl):
                        rows.append({"projection": proj} | r)
        except Exception as e:  # noqa: BLE001 (reported; the other implementations still run)
            errors[impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows = [r for r in rows if r["impl"] != impl]
            print(f"{impl}: failed, {errors[impl]}")
    print()
    print("| impl | projection | load | pass | grouped TFLOP/s | dense TFLOP/s | grouped / dense | max rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['projection']} [{r['R']}x{r['K']}]x[{r['E']}x{r['K']}x{r['N']}] | {r['load']} | "
              f"{r['pass']} | {r['grouped_tflops']:.3f} | {r['dense_tflops']:.3f} | {r['ratio']:.1%} | "
              f"{r['max_rel_err']:.1e} |")
    by_impl = {i: {ps: min(r["ratio"] for r in rows if r["pass"] == ps and r["impl"] == i) for ps in ("fwd", "fwd+bwd")}
               for i in impls if i not in errors}
    best = max(by_impl, key=lambda i: min(by_impl[i].values())) if by_impl else None
    out = {"backend": runtime.platform(), "device": runtime.device_kind(), "dtype": jnp.dtype(dtype).name,
           "tokens": tokens, "top_k": top, "rows": rows, "errors": errors, "best_impl": best,
           "min_ratio_by_impl": by_impl, "min_ratio": by_impl.get(best)}
    for i, m in by_impl.items():
        print(f"\n{i}: lowest grouped / dense: forward {m['fwd']:.1%}, forward + backward {m['fwd+bwd']:.1%} "
              f"(target >= 60%)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
