"""FP8 (E4M3) block-scaled GEMMs and linear layers: DeepSeek-V3's FP8 training recipe (REFERENCE.md section 6).

    quant.py   1x128 tile / 128x128 block quantisation, scales, padding, inverses
    gemm.py    block-scaled GEMM with per-128-K FP32 promotion: jnp reference, jnp blocked, Pallas kernels
    linear.py  custom_vjp FP8 matmul / einsum / MoE expert GEMM (Fprop, Dgrad, Wgrad all in FP8)
"""
from dsv3_jax.fp8 import gemm  # the module; the GEMM itself is dsv3_jax.fp8.gemm.gemm
from dsv3_jax.fp8.linear import Fp8Options, fp8_einsum, fp8_expert_blocks, fp8_matmul
from dsv3_jax.fp8.quant import (
    AMAX_FLOOR,
    FP8,
    FP8_MAX,
    TILE,
    dequantize_blocks,
    dequantize_tiles,
    quantize_blocks,
    quantize_tiles,
    scale_from_amax,
)

__all__ = ["gemm", "Fp8Options", "fp8_einsum", "fp8_expert_blocks", "fp8_matmul", "AMAX_FLOOR", "FP8", "FP8_MAX",
           "TILE", "dequantize_blocks", "dequantize_tiles", "quantize_blocks", "quantize_tiles", "scale_from_amax"]
