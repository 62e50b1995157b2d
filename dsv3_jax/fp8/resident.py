"""FP8-resident weights: inference GEMMs on the released checkpoint's 128x128-block FP8 weights, as shipped.

DeepSeek-V3/R1 store every projection and expert weight W [out, in] as E4M3 values q plus float32
`weight_scale_inv` s [ceil(out/128), ceil(in/128)] (W ~= q * s per block, REFERENCE.md section 5). A model
built with `Runtime.fp8_weights` keeps exactly those two arrays on the device (1 byte per weight plus one
float per 16,384) instead of a dequantised copy, and multiplies with them:

    'w8a8'         activations quantised on the fly in 1x128 tiles (per token per 128 channels), then the
                   block-scaled FP8 GEMM of `gemm.py`: DeepSeek's own serving recipe (and SGLang's, vLLM's).
    'weight_only'  activations stay in the compute dtype; each fp8 block of the weight is upcast inside the
                   GEMM and its partial sum scaled by the block's scale. Equal to the dequantised model up
                   to float32 rounding (the sum runs block by block).

Storage ("NK" orientation, the checkpoint's own): an `Einsum` 'BTQ,QNH->BTNH' whose float kernel is
[Q, N, H] (in -> out) holds `kernel` [N, H, Q] float8_e4m3fn (the checkpoint's q_b_proj [N*H, Q] with the
head axis split out) and `kernel_scale` [ceil(N*H/128), ceil(Q/128)] float32; routed experts hold
`w_gate` / `w_up` [E, F, D], `w_down` [E, D, F] and `w_*_scale` [E, Nb, Kb]. The weight keeps its logical
axis names (permuted with it), so it is sharded by the same rules as the float kernel; scales are sharded
along their stacked layer/expert axes and replicated along the two block axes (they are 1/4096 of the
weight's bytes). Both are `Fp8Param`s: `nnx.Param`s, so checkpointing, placement and the HF plan treat
them as parameters.

The weights themselves are frozen: differentiating with respect to them raises a clear error (training needs
float weights; load the checkpoint dequantised, i.e. without keep_fp8). Gradients with respect to the activations
flow (the "dgrad" of DeepSeek's recipe, here through the dequantised blocks), so adapters trained beside a frozen
FP8 base (LoRA, `dsv3_jax/lora.py`) get theirs while the released weights stay FP8 in memory; the trainer stops
the gradient at the FP8 leaves (`param_kinds.freeze_fp8`). Everything that is not a projection (embedding, head,
norms, router, biases, MTP's eh_proj) stays in its stored float dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.cli import UserError
from dsv3_jax.fp8.gemm import gemm
from dsv3_jax.fp8.quant import FP8, TILE, ceil_div, dequantize_blocks, quantize_blocks, quantize_tiles
from dsv3_jax.runtime import Fp8Weights, fp8_backend, fp8_impl, fp8_interpret

SCALE_SUFFIX = "_scale"  # kernel -> kernel_scale, w_gate -> w_gate_scale


class Fp8Param(nnx.Param):
    """A parameter held in FP8 as shipped (the E4M3 values) or its block scales: served, never trained."""


class QWeight(NamedTuple):
    """An FP8-resident weight in the checkpoint's [..., N, K] orientation ([out, in]) and its block scales."""

    q: jax.Array  # [..., N, K] float8_e4m3fn
    s: jax.Array  # [..., ceil(N/128), ceil(K/128)] float32

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The dequantised [..., N, K] weight (reference paths and tests; the serving GEMMs never build it)."""
        return dequantize_blocks(_pad_nk(self.q), self.s, self.q.shape[-2:], dtype)


def _pad_nk(q: jax.Array) -> jax.Array:
    *lead, N, K = q.shape
    pads = [(0, 0)] * len(lead) + [(0, -N % TILE), (0, -K % TILE)]
    return jnp.pad(q, pads) if any(p[1] for p in pads) else q


def scale_shape(nk_shape) -> tuple[int, ...]:
    """Block-scale shape of an [..., N, K] weight."""
    *lead, N, K = nk_shape
    return (*lead, ceil_div(N, TILE), ceil_div(K, TILE))


def quantize_weight(w_nk: jax.Array) -> QWeight:
    """A float [..., N, K] weight -> its FP8 blocks and scales, exactly as the release stores them (the one
    block quantiser, `quant.quantize_blocks`, with the padding cropped from the values)."""
    q, s = quantize_blocks(w_nk)
    N, K = w_nk.shape[-2:]
    return QWeight(q[..., :N, :K], s)


# ---------------------------------------------------------------------------------------------- frozen weights
FROZEN = ("FP8-resident weights are for inference and frozen fine-tuning: they have no gradient. To train them, "
          "load the checkpoint dequantised (without keep_fp8 / --keep_fp8); to fine-tune beside them, use LoRA.")


def _frozen_gemm(forward, dgrad):
    """A GEMM y = forward(x, q, s, *static) whose weights (q, s) are frozen: its VJP gives x's gradient by
    `dgrad(g, q, s, *static)` and refuses (UserError, while tracing) to differentiate with respect to q or s."""

    @jax.custom_vjp
    def f(x, q, s, *static):
        return forward(x, q, s, *static)

    def fwd(x, q, s, *static):
        if q.perturbed or s.perturbed:
            raise UserError(FROZEN)
        st = tuple(a.value for a in static)
        return forward(x.value, q.value, s.value, *st), (q.value, s.value, st, jnp.zeros((), x.value.dtype))

    def bwd(res, g):
        q, s, st, like = res
        if isinstance(g, jax.custom_derivatives.SymbolicZero):
            g = jnp.zeros(g.aval.shape, g.aval.dtype)
        dx = dgrad(g, q, s, *st).astype(like.dtype)
        return (dx, jnp.zeros_like(q), jnp.zeros_like(s)) + tuple(_zero_cotangent(a) for a in st)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


# ---------------------------------------------------------------------------------------------- GEMMs
def _kw(fw: Fp8Weights) -> dict:
    return fw.options.gemm_kw()


def matmul(x: jax.Array, w: QWeight, fw: Fp8Weights, out_dtype=None) -> jax.Array:
    """y = x @ W^T for x [M, K] and an FP8-resident W [N, K] -> [M, N] in x.dtype (or out_dtype)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype

    def forward(x, q, s):
        if fw.mode == "w8a8":
            qx, sx = quantize_tiles(x, pow2=fw.options.pow2_scales)
            return gemm(qx, sx, q, s, out_dtype=out_dtype, **_kw(fw))
        return gemm(x, None, q, s, out_dtype=out_dtype, **_kw(fw))

    def dgrad(g, q, s):  # dx = g @ W, W dequantised from its blocks
        return jnp.dot(g.astype(jnp.float32), QWeight(q, s).dequantize(jnp.float32))

    return _frozen_gemm(forward, dgrad)(x, w.q, w.s)


def contracted(eq: str) -> int:
    """Number of leading weight axes an einsum 'x,w->out' contracts (its weight's K axes)."""
    lhs, out = eq.replace(" ", "").split("->")
    ws = lhs.split(",")[1]
    nc = len([c for c in ws if c not in out])
    if ws[:nc] != "".join(c for c in ws if c not in out):
        raise UserError(f"{eq!r}: FP8-resident projections want the contracted axes first in the weight")
    return nc


def einsum(eq: str, x: jax.Array, w: QWeight, fw: Fp8Weights) -> jax.Array:
    """jnp.einsum(eq, x, W) for a projection eq ('BTD,DNH->BTNH': x's trailing axes contract with the float
    kernel's leading axes) on an FP8-resident W stored [N..., K...] (the float kernel's axes, output axes
    first). Output dtype: x.dtype."""
    nc = contracted(eq)
    kshape = w.q.shape[w.q.ndim - nc:]
    nshape = w.q.shape[: w.q.ndim - nc]
    if x.shape[x.ndim - nc:] != kshape:
        raise UserError(f"{eq!r}: x {x.shape} does not contract with the FP8 weight {w.q.shape} ([N..., K...])")
    K, N = math.prod(kshape), math.prod(nshape)
    y = matmul(x.reshape(-1, K), QWeight(w.q.reshape(N, K), w.s), fw)
    return y.reshape(*x.shape[: x.ndim - nc], *nshape)


def expert_blocks(xb: jax.Array, w: QWeight, block_expert: jax.Array, fw: Fp8Weights) -> jax.Array:
    """Routed-expert GEMM in the 'blocks' layout on FP8-resident experts: out[n] = xb[n] @ W[block_expert[n]]^T.
    xb [nb, b, K], W [E, N, K] with scales [E, Nb, Kb] -> [nb, b, N] in xb.dtype."""
    nb, b, K = xb.shape
    if w.q.ndim != 3 or w.q.shape[2] != K:
        raise UserError(f"FP8 expert GEMM: rows {xb.shape} and experts {w.q.shape} ([E, N, K]) do not contract")
    o = fw.options
    if fp8_impl(o.impl) == "pallas" and not fp8_interpret(o.interpret):
        if fp8_backend(o.backend) == "triton" and (b < 16 or b & (b - 1)):
            raise UserError(f"FP8 expert GEMM: block size {b} (config.model.moe_block_size) must be a power of two "
                            f">= 16 for the Triton kernel (64 or 128).")
    def forward(xb, q, s, block_expert):
        x2 = xb.reshape(nb * b, K)
        kw = dict(groups=block_expert.astype(jnp.int32), group_rows=b, out_dtype=xb.dtype, **_kw(fw))
        if fw.mode == "w8a8":
            qx, sx = quantize_tiles(x2, pow2=o.pow2_scales)
            return gemm(qx, sx, q, s, **kw).reshape(nb, b, -1)
        return gemm(x2, None, q, s, **kw).reshape(nb, b, -1)

    def dgrad(g, q, s, block_expert):  # dx[n] = g[n] @ W[e_n], each block's expert dequantised
        w_deq = QWeight(q, s).dequantize(jnp.float32)  # [E, N, K]
        return jnp.einsum("nbN,nNK->nbK", g.astype(jnp.float32), w_deq[block_expert])

    return _frozen_gemm(forward, dgrad)(xb, w.q, w.s, block_expert)


def is_fp8(x) -> bool:
    return getattr(x, "dtype", None) == FP8
