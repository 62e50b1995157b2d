"""Rotary position embedding with YaRN frequencies, on interleaved channel pairs.

Frequencies (d = qk_rope_head_dim, theta = rope_theta):  inv_freq_j = theta^(-2j/d), j < d/2.
YaRN (REFERENCE.md section 2) blends interpolated and original frequencies per channel:
    fcd(r) = d * ln(L0 / (2 pi r)) / (2 ln theta)      (channel whose wavelength fits r turns in L0)
    low = max(floor(fcd(beta_fast)), 0),  high = min(ceil(fcd(beta_slow)), d - 1)
    ramp_j = clip((j - low) / (high - low), 0, 1)
    inv_freq_j <- inv_freq_j * ((1 - ramp_j) + ramp_j / factor)
High-frequency channels (j < low) keep their frequency, low-frequency ones (j > high) are divided by
`factor`. cos/sin are multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim), which is
1.0 for DeepSeek-V3; the attention temperature mscale^2 lives in `ModelConfig.softmax_scale`.

Layout: DeepSeek's reference rotates interleaved pairs (x[2i], x[2i+1]) as complex numbers:
    y[2i] = x[2i] cos - x[2i+1] sin,   y[2i+1] = x[2i] sin + x[2i+1] cos.
We do the same, so released weights need no row permutation. Tables are float32.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig, yarn_mscale


def yarn_inv_freq(dim: int, theta: float, rope_scaling=None) -> np.ndarray:
    """Inverse frequencies [dim/2] (float64 numpy), YaRN-blended when `rope_scaling` is set."""
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if rope_scaling is None or rope_scaling.factor <= 1.0:
        return inv_freq
    rs = rope_scaling
    L0 = rs.original_max_position_embeddings

    def fcd(rot):
        return dim * math.log(L0 / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(fcd(rs.beta_fast)), 0)
    high = min(math.ceil(fcd(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return inv_freq * ((1.0 - ramp) + ramp / rs.factor)


def rope_attention_factor(cfg: ModelConfig) -> float:
    rs = cfg.rope_scaling
    if rs is None or rs.factor <= 1.0:
        return 1.0
    return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + [dr/2], float32."""
    inv_freq = jnp.asarray(yarn_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    f = rope_attention_factor(cfg)
    return jnp.cos(angles) * f, jnp.sin(angles) * f


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of x [B, T, N, dr] by cos/sin [B, T, dr/2]; math in float32."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [B, T, N, dr/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    y = jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)
    return y.reshape(x.shape).astype(x.dtype)
