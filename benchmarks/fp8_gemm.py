"""TFLOP/s of the block-scaled FP8 GEMM kernel (dsv3_jax/fp8/gemm.py) against XLA's BF16 `jnp.dot`
at DeepSeek-V3 projection shapes (M = 4096 tokens; (K, N) from the attention and MoE projections).

    python benchmarks/fp8_gemm.py [--m 4096] [--iters 20] [--quick]

On a GPU (Triton backend) or TPU (Mosaic) it prints, per shape: the kernel's best tile configuration,
its TFLOP/s on pre-quantised operands (the DeepGEMM convention), the TFLOP/s including the 1x128
quantisation of the activations, XLA's BF16 dot, the ratio, and the kernel's max error relative to the
jnp blocked path (f32 output) on the same fp8 operands. Anchors (REFERENCE.md section 8): H800 FP8 dense peak 1979,
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

from dsv3_jax.fp8 import quant as Q
from dsv3_jax.fp8.gemm import gemm

SHAPES = [(7168, 2112), (1536, 24576), (512, 32768), (16384, 7168), (7168, 4096), (2048, 7168)]  # (K, N)
GPU_CONFIGS = [dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
               dict(block_m=128, block_n=128, num_warps=4, num_stages=4),
               dict(block_m=128, block_n=256, num_warps=8, num_stages=3),
               dict(block_m=64, block_n=128, num_warps=4, num_stages=4)]
TPU_CONFIGS = [dict(block_m=128, block_n=128), dict(block_m=256, block_n=256), dict(block_m=512, block_n=256)]


def bench(f, *args, iters=20):
    out = f(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def operands(M, K, N, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (M, K), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (N, K), jnp.float32) * K ** -0.5).astype(jnp.bfloat16)  # stored [N, K]
    return x, w


def accelerator_table(M, iters, quick):
    backend = jax.default_backend()
    configs = (GPU_CONFIGS if backend == "gpu" else TPU_CONFIGS)[: 1 if quick else None]
    print(f"device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}, M={M}")
    hdr = (f"{'M':>5} {'K':>6} {'N':>6} | {'fp8 kernel':>10} {'+quant x':>9} | {'bf16 XLA':>9} | "
           f"{'ratio':>5} | {'rel err':>8} | best config")
    print(hdr + "\n" + "-" * len(hdr))
    for K, N in SHAPES:
        x, w = operands(M, K, N)
        qx, sx = jax.jit(Q.quantize_tiles)(x)
        qw, sw = jax.jit(Q.quantize_blocks)(w)
        flops = 2.0 * M * N * K
        t_bf16, ref_bf16 = bench(jax.jit(lambda a, b: jnp.dot(a, b.T)), x, w, iters=iters)
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
              f"{flops / t_bf16 / 1e12:>9.1f} | {t_bf16 / t:>5.2f} | {err:>8.1e} | {cfg}")
        del ref_bf16


def cpu_check():
    M, K, N = 256, 384, 200
    x, w = operands(M, K, N)
    qx, sx = Q.quantize_tiles(x)
    qw, sw = Q.quantize_blocks(w)
    A = np.asarray(Q.dequantize_tiles(qx, sx, K), np.float64)
    B = np.asarray(Q.dequantize_blocks(qw, sw, (N, K)), np.float64)
    ref = A @ B.T
    print(f"CPU interpret-mode check, M={M} K={K} N={N} (max |err| / max |ref|, fp64 reference on the "
          f"dequantised operands):")
    for backend in ("triton", "mosaic_tpu"):
        for dt in (jnp.float32, jnp.bfloat16):
            out = gemm(qx, sx, qw, sw, impl="pallas", backend=backend, interpret=True, out_dtype=dt)[:, :N]
            err = np.abs(np.asarray(out.astype(jnp.float32), np.float64) - ref).max() / np.abs(ref).max()
            print(f"  pallas {backend:<10} out {jnp.dtype(dt).name:<8} {err:.1e}")

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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="one tile configuration per shape")
    p.add_argument("--no-cpu-check", action="store_true")
    a = p.parse_args()
    if jax.default_backend() in ("gpu", "tpu"):
        accelerator_table(a.m, a.iters, a.quick)
        return 0
    print(f"skipped: no GPU or TPU (jax backend '{jax.default_backend()}'); the kernel TFLOP/s table needs "
          f"an accelerator.")
    if not a.no_cpu_check:
        cpu_check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
