"""TFLOP/s of the block-scaled FP8 GEMM kernel (dsv3_jax/fp8/gemm.py) against XLA's BF16 `jnp.dot`
at DeepSeek-V3 projection shapes (M = 4096 tokens; (K, N) from the attention and MoE projections).

    python benchmarks/fp8_gemm.py [--m 4096] [--iters 20] [--quick]

On a GPU (Triton backend) or TPU (Mosaic) it first checks the compiled kernels (dense, grouped, segmented)
against an fp64 reference at small ragged shapes, then prints, per shape: the kernel's best tile
configuration, its TFLOP/s on pre-quantised operands (the DeepGEMM convention), the TFLOP/s including the
1x128 quantisation of the activations, the jnp 'blocked' formulation (XLA's own fp8 dot with the K blocks
as a batch dimension, then the per-block rescale and an f32 sum), XLA's plain fp8 dot without block scales
(one e4m3 x e4m3 -> f32 dot: the speed of XLA's fp8 GEMM, not the recipe), the fp8 operands dequantised
to bf16 and multiplied by XLA's BF16 dot (exact operands when the scales are powers of two), XLA's BF16 dot, the
kernel's
speed-up over BF16, and the kernel's max error relative to the jnp blocked path (f32 output) on the same
fp8 operands. Anchors (REFERENCE.md section 8): H800 FP8 dense peak 1979,
DeepGEMM up to 1550 TFLOP/s; BF16 peak 989.

Without an accelerator it says so and exits 0 after a CPU check: the kernel in interpret mode against
the reference for one small shape, and the CPU cost of the jnp formulations relative to an f32 dot.
"""
import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import runtime
from dsv3_jax.fp8 import quant as Q
from dsv3_jax.fp8.gemm import gemm

SHAPES = [(7168, 2112), (1536, 24576), (512, 32768), (16384, 7168), (7168, 4096), (2048, 7168)]  # (K, N)
GPU_CONFIGS = [dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
               dict(block_m=128, block_n=128, num_warps=4, num_stages=4),
               dict(block_m=128, block_n=256, num_warps=8, num_stages=3),
               dict(block_m=128, block_n=256, num_warps=8, num_stages=4),
               dict(block_m=256, block_n=128, num_warps=8, num_stages=3),
               dict(block_m=64, block_n=128, num_warps=4, num_stages=4)]
TPU_CONFIGS = [dict(block_m=128, block_n=128), dict(block_m=256, block_n=256), dict(block_m=512, block_n=256)]


def bench(f, *args, iters=20, reps=5):
    """Median over `reps` of the mean time of `iters` back-to-back calls (one sync per rep, so the host's
    dispatch overlaps the device work, as in a training step)."""
    out = f(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            o = f(*args)
        jax.block_until_ready(o)
        times.append((time.perf_counter() - t0) / iters)
    return float(np.median(times)), out


def _try_bench(f, *args, iters):
    try:
        return bench(f, *args, iters=iters)[0]
    except Exception as e:  # e.g. the blocked path's [Kb, M, N] f32 intermediate out of memory
        print(f"  {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return float("nan")


def gpu_check():
    """Compiled kernels (no interpret mode) against fp64 on the dequantised operands: dense at ragged
    shapes, grouped (MoE blocks) and segmented (MoE Wgrad). Returns False on any miss."""
    from dsv3_jax.fp8.gemm import gemm_segmented

    def rel(out, ref):
        return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())

    ok = True
    rng = np.random.default_rng(0)
    for M, K, N in ((256, 384, 200), (130, 200, 72), (512, 7168, 2112)):
        x = jnp.asarray(rng.standard_normal((M, K), np.float32))
        w = jnp.asarray(rng.standard_normal((N, K), np.float32) * K ** -0.5)
        qx, sx = Q.quantize_tiles(x)
        qw, sw = Q.quantize_blocks(w)
        A = np.asarray(Q.dequantize_tiles(qx, sx, K), np.float64)
        B = np.asarray(Q.dequantize_blocks(qw, sw, (N, K)), np.float64)
        ref = A @ B.T
        for dt, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 8e-3)):
            out = jax.jit(functools.partial(gemm, impl="pallas", out_dtype=dt))(qx, sx, qw, sw)[:, :N]
            err = rel(out.astype(jnp.float32), ref)
            ok &= err < tol and out.shape == (M, N)
            print(f"  dense     M={M:<4} K={K:<5} N={N:<5} out {jnp.dtype(dt).name:<8} rel max err {err:.1e}"
                  f"{'' if err < tol else '  FAIL'}")
    E, b, nb, K, N = 4, 64, 5, 200, 136
    groups = jnp.array([0, 0, 3, 1, 1], jnp.int32)
    x = jnp.asarray(rng.standard_normal((nb * b, K), np.float32))
    w = jnp.asarray(rng.standard_normal((E, N, K), np.float32) * K ** -0.5)
    qx, sx = Q.quantize_tiles(x)
    qw, sw = jax.vmap(Q.quantize_blocks)(w)
    A = np.asarray(Q.dequantize_tiles(qx, sx, K), np.float64)
    Bs = [np.asarray(Q.dequantize_blocks(qw[e], sw[e], (N, K)), np.float64) for e in range(E)]
    ref = np.concatenate([A[i * b:(i + 1) * b] @ Bs[int(e)].T for i, e in enumerate(groups)])
    for bn in (128, 64):
        out = jax.jit(functools.partial(gemm, group_rows=b, out_dtype=jnp.float32, impl="pallas", block_n=bn))(
            qx, sx, qw, sw, groups=groups)[:, :N]
        err = rel(out, ref)
        ok &= err < 1e-5
        print(f"  grouped   E={E} rows={nb}x{b} K={K} N={N} block_n={bn:<3} rel max err {err:.1e}"
              f"{'' if err < 1e-5 else '  FAIL'}")
    M, N, T, tk = 200, 136, 6, 128
    tg = jnp.array([0, 0, 2, 2, 2, 3], jnp.int32)
    qa, sa = Q.quantize_tiles(jnp.asarray(rng.standard_normal((M, T * tk), np.float32)))
    qb, sb = Q.quantize_tiles(jnp.asarray(rng.standard_normal((N, T * tk), np.float32)))
    A, B = np.asarray(Q.dequantize_tiles(qa, sa), np.float64), np.asarray(Q.dequantize_tiles(qb, sb), np.float64)
    ref = np.zeros((4, M, N))
    for t in range(T):
        ref[int(tg[t])] += A[:, t * tk:(t + 1) * tk] @ B[:, t * tk:(t + 1) * tk].T
    out = jax.jit(functools.partial(gemm_segmented, num_groups=4, impl="pallas"))(qa, sa, qb, sb, tg)
    err = rel(out, ref)
    zero = not np.asarray(out[1]).any()
    ok &= err < 1e-5 and zero
    print(f"  segmented M={M} N={N} T={T} groups [0 0 2 2 2 3] rel max err {err:.1e}, empty group zero: {zero}"
          f"{'' if err < 1e-5 and zero else '  FAIL'}")
    return ok


def operands(M, K, N, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (N, K), jnp.float32) * K ** -0.5).astype(jnp.bfloat16)  # stored [N, K]
    return x, w


def accelerator_table(M, iters, quick):
    backend = runtime.platform()
    configs = (GPU_CONFIGS if backend == "gpu" else TPU_CONFIGS)[: 1 if quick else None]
    print(f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}, M={M}")
    hdr = (f"{'M':>5} {'K':>6} {'N':>6} | {'fp8 kernel':>10} {'+quant x':>9} | {'jnp blocked':>11} "
           f"{'fp8 XLA 1x':>10} {'deq bf16':>8} | {'bf16 XLA':>9} | {'ratio':>5} | {'rel err':>8} | best config")
    print(hdr + "\n" + "-" * len(hdr))
    rows = []
    for K, N in SHAPES:
        x, w = operands(M, K, N)
        qx, sx = jax.jit(Q.quantize_tiles)(x)
        qw, sw = jax.jit(Q.quantize_blocks)(w)
        flops = 2.0 * M * N * K
        t_bf16, ref_bf16 = bench(jax.jit(lambda a, b: jnp.dot(a, b.T)), x, w, iters=iters)
        t_blk = _try_bench(jax.jit(functools.partial(gemm, out_dtype=jnp.bfloat16, impl="blocked")),
                           qx, sx, qw, sw, iters=max(1, iters // 4))
        t_x8 = _try_bench(jax.jit(lambda a, b: jax.lax.dot_general(
            a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
            qx, qw, iters=iters)
        t_deq = _try_bench(jax.jit(lambda qa, sa, qb, sb: jax.lax.dot_general(
            Q.dequantize_tiles(qa, sa, dtype=jnp.bfloat16), Q.dequantize_blocks(qb, sb, dtype=jnp.bfloat16),
            (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
            qx, sx, qw, sw, iters=iters)
        best = None
        for cfg in configs:
            f = jax.jit(functools.partial(gemm, out_dtype=jnp.bfloat16, impl="pallas", **cfg))
            try:
                t, out = bench(f, qx, sx, qw, sw, iters=iters)
            except Exception as e:  # a tile configuration the compiler rejects (e.g. shared memory)
                print(f"  config {cfg} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            if best is None or t < best[0]:
                best = (t, cfg, out)
        if best is None:
            print(f"{M:>5} {K:>6} {N:>6} | no kernel configuration compiled")
            continue
        t, cfg, out = best
        e2e = jax.jit(lambda x, qw, sw, cfg=cfg: gemm(*Q.quantize_tiles(x), qw, sw, out_dtype=jnp.bfloat16,
                                                      impl="pallas", **cfg))
        t_e2e, _ = bench(e2e, x, qw, sw, iters=iters)
        ref = jax.jit(functools.partial(gemm, out_dtype=jnp.float32, impl="blocked"))(qx, sx, qw, sw)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
        print(f"{M:>5} {K:>6} {N:>6} | {flops / t / 1e12:>10.1f} {flops / t_e2e / 1e12:>9.1f} | "
              f"{flops / t_blk / 1e12:>11.1f} {flops / t_x8 / 1e12:>10.1f} {flops / t_deq / 1e12:>8.1f} | "
              f"{flops / t_bf16 / 1e12:>9.1f} | {t_bf16 / t:>5.2f} | {err:>8.1e} | {cfg}")
        rows.append({"M": M, "K": K, "N": N, "fp8_tflops": flops / t / 1e12, "fp8_quant_x_tflops": flops / t_e2e / 1e12,
                     "bf16_tflops": flops / t_bf16 / 1e12, "speedup_vs_bf16": t_bf16 / t, "max_rel_err": err,
                     "config": cfg})
        del ref_bf16
    return rows


def cpu_check(quick=False):
    """The kernel in interpret mode against fp64 ({backend/dtype: max rel err}); unless `quick`, then the CPU
    cost of the jnp formulations."""
    M, K, N = 256, 384, 200
    x, w = operands(M, K, N)
    qx, sx = Q.quantize_tiles(x)
    qw, sw = Q.quantize_blocks(w)
    A = np.asarray(Q.dequantize_tiles(qx, sx, K), np.float64)
    B = np.asarray(Q.dequantize_blocks(qw, sw, (N, K)), np.float64)
    ref = A @ B.T
    print(f"CPU interpret-mode check, M={M} K={K} N={N} (max |err| / max |ref|, fp64 reference on the "
          f"dequantised operands):")
    errors = {}
    for backend in ("triton", "mosaic_tpu"):
        for dt in (jnp.float32, jnp.bfloat16):
            out = gemm(qx, sx, qw, sw, impl="pallas", backend=backend, interpret=True, out_dtype=dt)[:, :N]
            err = np.abs(np.asarray(out.astype(jnp.float32), np.float64) - ref).max() / np.abs(ref).max()
            print(f"  pallas {backend:<10} out {jnp.dtype(dt).name:<8} {err:.1e}")
            errors[f"{backend}/{jnp.dtype(dt).name}"] = float(err)
    if quick:
        return errors

    M, K, N = 1024, 1024, 1024
    x, w = operands(M, K, N)
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    qx, sx = jax.jit(Q.quantize_tiles)(x)
    qw, sw = jax.jit(Q.quantize_blocks)(w)
    t32, _ = bench(jax.jit(lambda a, b: jnp.dot(a, b.T)), x, w, iters=5)
    print(f"CPU cost of the jnp FP8 formulations, M=K=N={M} (f32 output), relative to an f32 jnp.dot "
          f"({2 * M * N * K / t32 / 1e9:.0f} GFLOP/s):")
    for impl in ("dequant", "blocked"):
        t, _ = bench(jax.jit(functools.partial(gemm, impl=impl, out_dtype=jnp.float32)), qx, sx, qw, sw, iters=5)
        t_q, _ = bench(jax.jit(lambda x, w, impl=impl: gemm(*Q.quantize_tiles(x), *Q.quantize_blocks(w),
                                                              impl=impl, out_dtype=jnp.float32)), x, w, iters=5)
        print(f"  {impl:<8} GEMM {t / t32:5.2f}x   with quantisation of both operands {t_q / t32:5.2f}x")
    return errors


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="one tile configuration per shape")
    p.add_argument("--no-cpu-check", action="store_true")
    p.add_argument("--no-gpu-check", action="store_true", help="skip the compiled-kernel correctness check")
    p.add_argument("--json", default="", help="also write the table (or the CPU check's errors) to this file")
    a = p.parse_args()
    out = {"backend": runtime.platform(), "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    code = _run(a, out)
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return code


def _run(a, out) -> int:
    if runtime.platform() == "gpu" and not a.no_gpu_check:
        print(f"compiled-kernel check on {jax.devices()[0].device_kind}, jax {jax.__version__} "
              f"(max |err| / max |ref| against fp64 on the dequantised operands):")
        out["compiled_check_passed"] = gpu_check()
        if not out["compiled_check_passed"]:
            print("FAILED: a compiled kernel disagrees with the reference")
            return 1
    if runtime.platform() in ("gpu", "tpu"):
        out["rows"] = accelerator_table(a.m, a.iters, a.quick)
        return 0
    print(f"skipped: no GPU or TPU (jax backend '{runtime.platform()}'); the kernel TFLOP/s table needs "
          f"an accelerator.")
    if not a.no_cpu_check:
        out["interpret_errors"] = cpu_check(quick=a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
