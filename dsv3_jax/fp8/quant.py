"""E4M3 quantisation with DeepSeek-V3's fine-grained scales (REFERENCE.md section 6).

Two granularities, both with online max-abs scales:
  * tiles  (activations, gradients): 1 x 128 — one scale per row per 128 consecutive elements of the
           last axis (per token per 128 channels).   x [..., K] -> q [..., Kp] e4m3, s [..., Kp/128] f32
  * blocks (weights): 128 x 128 — one scale per 128 x 128 block of the last two axes.
           w [..., R, C] -> q [..., Rp, Cp] e4m3, s [..., Rp/128, Cp/128] f32

For every tile or block:   s = max(amax, 1e-4) / 448,   q = e4m3(clip(x / s, -448, 448)),   x ~= q * s.
With `pow2=True` the scale is rounded UP to a power of two, s = 2^ceil(log2 s), so that scaling and
unscaling are exact (no rounding beyond the e4m3 cast; q stays within +-448 because s only grows).

A dimension that is not a multiple of 128 is zero-padded up to the next multiple (Kp, Rp, Cp); zeros
never change a tile's amax. The dequantisers take the original size and crop the padding away.

`s` is the *dequantisation* multiplier: for a weight stored [out, in] it is exactly the
`weight_scale_inv` tensor of DeepSeek's released FP8 checkpoints (REFERENCE.md section 5), so those
weights can be fed to `gemm.py` unchanged. Scales are float32; the cast to e4m3 rounds to nearest even.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
AMAX_FLOOR = 1e-4  # keeps all-zero tiles from dividing by zero (report section 3.3)
TILE = 128


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return ceil_div(a, b) * b


def pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pad `axis` of x up to a multiple of `multiple` (no copy when already aligned)."""
    axis = axis % x.ndim
    extra = round_up(x.shape[axis], multiple) - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def scale_from_amax(amax: jax.Array, pow2: bool = False) -> jax.Array:
    """s = max(amax, 1e-4) / 448 in float32; with pow2, the next power of two >= s."""
    s = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR) / FP8_MAX
    if pow2:
        m, e = jnp.frexp(s)  # s = m * 2^e with m in [0.5, 1)
        s = jnp.ldexp(jnp.ones_like(s), jnp.where(m == 0.5, e - 1, e))
    return s


def to_fp8(x: jax.Array, s: jax.Array) -> jax.Array:
    """e4m3(clip(x / s)); `s` broadcasts against x. Clipping guards the f32 rounding of x / s."""
    return jnp.clip(x.astype(jnp.float32) / s, -FP8_MAX, FP8_MAX).astype(FP8)


def quantize_tiles(x: jax.Array, *, tile: int = TILE, pow2: bool = False) -> tuple[jax.Array, jax.Array]:
    """1 x `tile` scaling along the last axis. x [..., K] -> (q [..., Kp] e4m3, s [..., Kp/tile] f32)."""
    x = pad_axis(x, -1, tile)
    t = x.reshape(*x.shape[:-1], x.shape[-1] // tile, tile).astype(jnp.float32)  # [..., Kb, tile]
    s = scale_from_amax(jnp.max(jnp.abs(t), axis=-1), pow2)  # [..., Kb]
    return to_fp8(t, s[..., None]).reshape(x.shape), s


def dequantize_tiles(q: jax.Array, s: jax.Array, k: int | None = None, dtype=jnp.float32) -> jax.Array:
    """Inverse of quantize_tiles: q [..., Kp], s [..., Kb] -> x [..., k] (k defaults to Kp)."""
    kb = s.shape[-1]
    tile = q.shape[-1] // kb
    t = q.reshape(*q.shape[:-1], kb, tile).astype(jnp.float32) * s[..., None]
    x = t.reshape(q.shape)
    return x[..., : (q.shape[-1] if k is None else k)].astype(dtype)


def quantize_blocks(w: jax.Array, *, block: int | tuple[int, int] = TILE,
                    pow2: bool = False) -> tuple[jax.Array, jax.Array]:
    """`block` x `block` scaling over the last two axes (or (rows, cols) blocks, as a checkpoint's
    `weight_block_size` may say). The one block quantiser of the package: training GEMMs and the FP8
    checkpoint writer (`interop.hf.save(fp8=True)`) both use it.

    w [..., R, C] -> (q [..., Rp, Cp] e4m3, s [..., Rp/br, Cp/bc] f32).
    """
    br, bc = (block, block) if isinstance(block, int) else block
    w = pad_axis(pad_axis(w, -1, bc), -2, br)
    *lead, R, C = w.shape
    b = w.reshape(*lead, R // br, br, C // bc, bc).astype(jnp.float32)
    s = scale_from_amax(jnp.max(jnp.abs(b), axis=(-3, -1)), pow2)  # [..., Rb, Cb]
    return to_fp8(b, s[..., :, None, :, None]).reshape(w.shape), s


def dequantize_blocks(q: jax.Array, s: jax.Array, shape: tuple[int, int] | None = None,
                      dtype=jnp.float32) -> jax.Array:
    """Inverse of quantize_blocks: q [..., Rp, Cp], s [..., Rb, Cb] -> w [..., R, C] (shape = (R, C))."""
    *lead, R, C = q.shape
    rb, cb = s.shape[-2:]
    b = q.reshape(*lead, rb, R // rb, cb, C // cb).astype(jnp.float32) * s[..., :, None, :, None]
    w = b.reshape(q.shape)
    r, c = (R, C) if shape is None else shape
    return w[..., :r, :c].astype(dtype)


def block_to_row_scales(s: jax.Array, rows: int, block: int = TILE) -> jax.Array:
    """Expand block scales [..., Rb, Cb] to one scale per row [..., rows, Cb] (row r uses block r // block)."""
    return jnp.repeat(s, block, axis=-2)[..., :rows, :]
