"""FP8 linear layers with a custom VJP: Fprop, Dgrad and Wgrad all run as block-scaled FP8 GEMMs.

For y = x @ W with x [M, K] (compute dtype) and W [K, N] (float32 master weight):

    Fprop  y  [M, N] = x  . W        x: 1x128 tiles along K;   W: 128x128 blocks (stored [N, K])
    Dgrad  dx [M, K] = dy . W^T      dy: 1x128 tiles along N;  W^T: the SAME fp8 blocks, transposed
    Wgrad  dW [K, N] = x^T . dy      x^T and dy^T: 1x128 tiles along M (i.e. 128x1 tiles of x and dy)

which is DeepSeek-V3's recipe (report section 3.3, REFERENCE.md section 6): every GEMM contracts over
its 128-wide tiles, accumulates with FP32 promotion per 128-element K block (gemm.py), and returns the
compute dtype (y, dx) or float32 (dW, for the FP32 master weights and gradients). Only the GEMM
operands are FP8; whatever the caller keeps outside these functions (embedding, head, router, norms,
attention core) stays in BF16/FP32.

Residuals. As in DeepSeek's training, the forward caches its input as fp8 1x128 tiles
(`cache_fp8_inputs=True`, half the memory of bf16); Wgrad dequantises it and re-quantises along M
(the transposed tiling the report describes). `cache_fp8_inputs=False` keeps x itself instead (one
rounding fewer in Wgrad). The weight is quantised once in the forward and its fp8 blocks are reused by Dgrad.

Entry points
  fp8_matmul(x [M, K], w [K, N] | [N, K], w_layout='KN' | 'NK')     -> [M, N] in x.dtype
  fp8_einsum('BTD,DNH->BTNH', x, w)   projections of layers.Einsum: x's trailing axes contract with w's
                                      leading axes (flattened to one K, blocks over the flattened axes)
  fp8_expert_blocks(xb [nb, b, K], w [E, K, N], block_expert [nb])   -> [nb, b, N]
        the routed experts in moe.py's 'blocks' layout: block n uses expert block_expert[n]. Fprop and
        Dgrad are grouped GEMMs; Wgrad sums each expert's row tiles (gemm_segmented) with tiles of
        gcd(b, 128) rows, so no tile straddles two experts.
All three take `options` (an Fp8Options) or its fields as keywords.

Wiring into the model (what `Runtime.fp8` switches, options from `Runtime.fp8_options`):
`layers.Einsum.__call__` returns
`fp8_einsum(self.eq, x.astype(self.dtype), self.kernel[...], options=...)` (the f32 master kernel, not a bf16 copy),
and the routed experts run in the 'blocks' layout with
`h = silu(fp8_expert_blocks(xb, w_gate, be)) * fp8_expert_blocks(xb, w_up, be)`,
`y = fp8_expert_blocks(h, w_down, be)` in place of the one-hot weight pick and the three einsums.
Embedding, lm_head, router, norms and the attention core (scores, softmax, PV) stay as they are.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from dsv3_jax.cli import UserError
from dsv3_jax.fp8.gemm import gemm, gemm_segmented
from dsv3_jax.fp8.quant import dequantize_tiles, quantize_blocks, quantize_tiles
from dsv3_jax.runtime import Fp8Options, fp8_backend, fp8_impl, fp8_interpret

__all__ = ["Fp8Options", "fp8_matmul", "fp8_einsum", "fp8_expert_blocks"]


def _options(options: Fp8Options | None, kw: dict) -> Fp8Options:
    if options is None:
        return Fp8Options(**kw)
    return dataclasses.replace(options, **kw) if kw else options


# ---------------------------------------------------------------------------------------------- dense
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, w, meta, o):
    return _matmul_fwd(x, w, meta, o)[0]


def _matmul_fwd(x, w, meta, o: Fp8Options):
    _, N, layout, _, _ = meta
    wt = w.T if layout == "KN" else w  # [N, K]: the K-major B operand
    qx, sx = quantize_tiles(x, pow2=o.pow2_scales)  # [M, Kp], [M, Kb]
    qw, sw = quantize_blocks(wt, pow2=o.pow2_scales)  # [Np, Kp], [Nb, Kb]
    y = gemm(qx, sx, qw, sw, out_dtype=x.dtype, block_m=o.block_m, **o.gemm_kw())[:, :N]
    xres = (qx, sx) if o.cache_fp8_inputs else x
    return y, (xres, qw, sw)


def _matmul_bwd(meta, o: Fp8Options, res, g):
    K, N, layout, xdt, wdt = meta
    xres, qw, sw = res
    p2, kw = o.pow2_scales, o.gemm_kw()
    # Dgrad: dx = g . W^T; B = W stored [K, N] = the forward's fp8 blocks transposed (no re-quantisation).
    qg, sg = quantize_tiles(g, pow2=p2)  # [M, Np], [M, Nb]
    dx = gemm(qg, sg, qw.T, sw.T, out_dtype=xdt, block_m=o.block_m, **kw)[:, :K]
    # Wgrad: contraction over M, so both operands are re-tiled 1x128 along M.
    x = dequantize_tiles(*xres, K) if isinstance(xres, tuple) else xres
    qxt, sxt = quantize_tiles(x.T, pow2=p2)  # [K, Mp], [K, Mb]
    qgt, sgt = quantize_tiles(g.T, pow2=p2)  # [N, Mp], [N, Mb]
    if layout == "KN":
        dw = gemm(qxt, sxt, qgt, sgt, out_dtype=jnp.float32, block_m=o.block_m, **kw)  # [K, N]
    else:
        dw = gemm(qgt, sgt, qxt, sxt, out_dtype=jnp.float32, block_m=o.block_m, **kw)  # [N, K]
    return dx, dw.astype(wdt)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def fp8_matmul(x: jax.Array, w: jax.Array, *, w_layout: str = "KN", options: Fp8Options | None = None,
               **kw) -> jax.Array:
    """y = x @ W in FP8 (all three GEMMs). x [M, K]; w [K, N] (w_layout='KN', the model's layout) or
    [N, K] ('NK', HF's [out, in]). Returns [M, N] in x.dtype; dW comes back in w.dtype (keep w float32)."""
    if w_layout not in ("KN", "NK"):
        raise UserError(f"fp8_matmul: w_layout={w_layout!r} must be 'KN' ([in, out]) or 'NK' ([out, in]).")
    if x.ndim != 2 or w.ndim != 2:
        raise UserError(f"fp8_matmul wants x [M, K] and a 2-D w, got {x.shape} and {w.shape}.")
    K, N = w.shape if w_layout == "KN" else w.shape[::-1]
    if x.shape[1] != K:
        raise UserError(f"fp8_matmul: x {x.shape} does not contract with w {w.shape} (w_layout={w_layout}).")
    return _matmul(x, w, (K, N, w_layout, x.dtype, w.dtype), _options(options, kw))


def _split_einsum(eq: str, x_ndim: int, w_ndim: int) -> int:
    """Number of contracted axes of 'x..., w...->out' when x's trailing axes meet w's leading axes in order
    and out = x's other axes + w's other axes; raises ValueError for any other equation."""
    eq = eq.replace(" ", "")
    try:
        lhs, out = eq.split("->")
        xs, ws = lhs.split(",")
    except ValueError:
        raise UserError(f"fp8_einsum: cannot parse {eq!r}; expected 'x,w->out'.") from None
    if "." in ws:
        raise UserError(f"fp8_einsum: {eq!r}: the weight may not have an ellipsis.")
    contracted = [c for c in ws if c not in out]
    nc = len(contracted)
    ok = (nc > 0 and ws[:nc] == "".join(contracted) and xs.endswith("".join(contracted))
          and out == xs[: len(xs) - nc] + ws[nc:] and len(ws) == w_ndim
          and (("..." in xs) or len(xs) == x_ndim))
    if not ok:
        raise UserError(f"fp8_einsum: {eq!r} is not of the form 'A..C,C..N->A..N' (x's trailing axes contract "
                        f"with w's leading axes, in order); use jnp.einsum for it or reorder the weight axes.")
    return nc


def fp8_einsum(eq: str, x: jax.Array, w: jax.Array, *, options: Fp8Options | None = None, **kw) -> jax.Array:
    """jnp.einsum(eq, x, w) for projection equations (e.g. 'BTD,DNH->BTNH', '...F,FD->...D',
    'BTNH,NHD->BTD') through fp8_matmul: x -> [M, K], w -> [K, N] with K and N the flattened contracted
    and output axes. Output dtype: x.dtype. Weight blocks are 128x128 over the flattened [K, N] view,
    which is the block layout of the released FP8 checkpoints ([out, in] = [N, K])."""
    nc = _split_einsum(eq, x.ndim, w.ndim)
    batch, kshape, nshape = x.shape[: x.ndim - nc], w.shape[:nc], w.shape[nc:]
    if x.shape[x.ndim - nc:] != kshape:
        raise UserError(f"fp8_einsum {eq!r}: contracted axes of x {x.shape} and w {w.shape} differ.")
    K, N = math.prod(kshape), math.prod(nshape)
    y = fp8_matmul(x.reshape(-1, K), w.reshape(K, N), options=options, **kw)
    return y.reshape(*batch, *nshape)


# ---------------------------------------------------------------------------------------------- experts
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _experts(xb, w, block_expert, meta, o):
    return _experts_fwd(xb, w, block_expert, meta, o)[0]


def _experts_fwd(xb, w, block_expert, meta, o: Fp8Options):
    nb, b, K = xb.shape
    N = meta[1]
    qx, sx = quantize_tiles(xb.reshape(nb * b, K), pow2=o.pow2_scales)  # [P, Kp], [P, Kb]
    qw, sw = quantize_blocks(jnp.swapaxes(w, 1, 2), pow2=o.pow2_scales)  # [E, Np, Kp], [E, Nb, Kb]
    y = gemm(qx, sx, qw, sw, groups=block_expert, group_rows=b, out_dtype=xb.dtype, **o.gemm_kw())
    xres = (qx, sx) if o.cache_fp8_inputs else xb.reshape(nb * b, K)
    res = (xres, qw, sw, block_expert)
    return y[:, :N].reshape(nb, b, N), res


def _experts_bwd(meta, o: Fp8Options, res, g):
    K, N, E, xdt, wdt = meta
    xres, qw, sw, block_expert = res
    nb, b, _ = g.shape
    P = nb * b
    p2, kw = o.pow2_scales, o.gemm_kw()
    g2 = g.reshape(P, N)
    qg, sg = quantize_tiles(g2, pow2=p2)  # [P, Np], [P, Nb]
    dx = gemm(qg, sg, jnp.swapaxes(qw, 1, 2), jnp.swapaxes(sw, 1, 2), groups=block_expert, group_rows=b,
              out_dtype=xdt, **kw)[:, :K]
    x2 = dequantize_tiles(*xres, K) if isinstance(xres, tuple) else xres  # [P, K]
    tm = math.gcd(b, 128)  # Wgrad tiles along rows: never straddle two blocks (two experts)
    qxt, sxt = quantize_tiles(x2.T, tile=tm, pow2=p2)  # [K, P], [K, T]
    qgt, sgt = quantize_tiles(g2.T, tile=tm, pow2=p2)  # [N, P], [N, T]
    tile_groups = jnp.repeat(block_expert, b // tm)
    dw = gemm_segmented(qxt, sxt, qgt, sgt, tile_groups, E, out_dtype=jnp.float32, block_m=o.block_m, **kw)
    return dx.reshape(nb, b, K), dw.astype(wdt), None


_experts.defvjp(_experts_fwd, _experts_bwd)


def fp8_expert_blocks(xb: jax.Array, w: jax.Array, block_expert: jax.Array, *,
                      options: Fp8Options | None = None, **kw) -> jax.Array:
    """Routed-expert GEMM in the 'blocks' layout: out[n] = xb[n] @ w[block_expert[n]] in FP8.

    xb [nb, b, K] (rows grouped into blocks of b, as built by moe.experts_blocks), w [E, K, N] (float32
    master weights, the model's [E, D, F] / [E, F, D] layout), block_expert [nb] int32, non-decreasing
    (true of moe.block_layout). Returns [nb, b, N] in xb.dtype; dW in w.dtype. For the Pallas kernel, b is
    the kernel's row tile: use a power of two >= 16 on GPU and a multiple of 32 on TPU (64 or 128).
    """
    if xb.ndim != 3 or w.ndim != 3 or block_expert.shape != (xb.shape[0],) or xb.shape[2] != w.shape[1]:
        raise UserError(f"fp8_expert_blocks wants xb [nb, b, K], w [E, K, N], block_expert [nb]; got "
                        f"{xb.shape}, {w.shape}, {block_expert.shape}.")
    E, K, N = w.shape
    o = _options(options, kw)
    b = xb.shape[1]
    if fp8_impl(o.impl) == "pallas" and not fp8_interpret(o.interpret):
        if fp8_backend(o.backend) == "mosaic_tpu" and b % 128:
            raise UserError(f"fp8_expert_blocks: block size {b} (config.model.moe_block_size) must be a multiple "
                            f"of 128 for the TPU kernels (Wgrad tiles the block rows along lanes).")
        if fp8_backend(o.backend) == "triton" and (b < 16 or b & (b - 1)):
            raise UserError(f"fp8_expert_blocks: block size {b} (config.model.moe_block_size) must be a power of "
                            f"two >= 16 for the Triton kernels (64 or 128).")
    return _experts(xb, w, block_expert.astype(jnp.int32), (K, N, E, xb.dtype, w.dtype), o)
