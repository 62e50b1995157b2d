"""FP8 (E4M3) block-scaled GEMMs and linear layers: DeepSeek-V3's FP8 training recipe (REFERENCE.md section 6).

    quant.py   1x128 tile / 128x128 block quantisation, scales, padding, inverses
    gemm.py    block-scaled GEMM with per-128-K FP32 promotion: jnp reference, jnp blocked, Pallas kernels
    linear.py  custom_vjp FP8 matmul / einsum / MoE expert GEMM (Fprop, Dgrad, Wgrad all in FP8)
"""
from dsv3_jax.fp8.quant import (FP8, FP8_MAX, AMAX_FLOOR, TILE, quantize_tiles, dequantize_tiles,
                                quantize_blocks, dequantize_blocks, scale_from_amax)
from dsv3_jax.fp8 import gemm  # the module; the GEMM itself is dsv3_jax.fp8.gemm.gemm
from dsv3_jax.fp8.linear import Fp8Options, fp8_matmul, fp8_einsum, fp8_expert_blocks
