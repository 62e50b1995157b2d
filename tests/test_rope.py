"""RoPE with YaRN: inverse frequencies against hand-computed values, the interleaved-pair rotation
against complex multiplication in numpy, norm preservation and the relative-position property."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import RopeScaling
from dsv3_jax.rope import apply_rope, rope_attention_factor, rope_tables, yarn_inv_freq

from reference import numpy_ref as ref
from reference import tiny_config

V3_YARN = RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0)


def test_yarn_low_high_by_hand():
    # fcd(r) = d ln(L0 / (2 pi r)) / (2 ln theta), d = 64, theta = 1e4, L0 = 4096:
    #   fcd(32) = 64 ln(4096 / 201.06) / 18.42 = 64 * 3.0142 / 18.4207 = 10.47 -> low  = floor = 10
    #   fcd(1)  = 64 ln(4096 / 6.2832) / 18.42 = 64 * 6.4799 / 18.4207 = 22.51 -> high = ceil  = 23
    fcd = lambda r: 64 * math.log(4096 / (2 * math.pi * r)) / (2 * math.log(1e4))  # noqa: E731
    assert fcd(32) == pytest.approx(10.472, abs=1e-3)
    assert fcd(1) == pytest.approx(22.513, abs=1e-3)
    low, high = 10, 23
    inv = yarn_inv_freq(64, 1e4, V3_YARN)
    assert inv.shape == (32,)
    base = lambda j: 1e4 ** (-2 * j / 64)  # noqa: E731
    # Channels up to `low` (ramp 0) keep their frequency.
    for j in (0, 1, 5, 9, low):
        assert inv[j] == pytest.approx(base(j), rel=1e-12), j
    # Channels from `high` on (ramp 1) are interpolated by the factor 40.
    for j in (high, 24, 31):
        assert inv[j] == pytest.approx(base(j) / 40.0, rel=1e-12), j
    # In the ramp: j = 16 -> ramp 6/13: 1e4^-0.5 * (7/13 + 6/(13*40)) = 0.01 * 143/260 = 0.0055.
    assert inv[16] == pytest.approx(0.0055, rel=1e-12)
    # j = 11 -> ramp 1/13.
    assert inv[11] == pytest.approx(base(11) * (12 / 13 + 1 / (13 * 40)), rel=1e-12)
    # Strictly between the two regimes inside the ramp.
    for j in range(low + 1, high):
        assert base(j) / 40 < inv[j] < base(j)


def test_inv_freq_without_scaling():
    d, theta = 16, 500.0
    want = np.array([theta ** (-2 * j / d) for j in range(d // 2)])
    np.testing.assert_allclose(yarn_inv_freq(d, theta, None), want, rtol=1e-13)
    # factor 1 means no scaling at all.
    np.testing.assert_allclose(yarn_inv_freq(d, theta, RopeScaling(factor=1.0)), want, rtol=1e-13)
    assert want[0] == 1.0 and want[1] == pytest.approx(500 ** -0.125)


def test_yarn_low_equals_high_edge():
    # L0 = 4 < 2 pi: fcd(32) < fcd(1) = 8 ln(4 / 2pi) / (2 ln 1e4) = -0.196 < 0, so low = max(floor, 0) = 0 and
    # high = ceil(-0.196) = 0 -> high += 0.001: channel 0 keeps its frequency, every other one is divided.
    rs = RopeScaling(factor=10.0, original_max_position_embeddings=4, beta_fast=32.0, beta_slow=1.0)
    inv = yarn_inv_freq(8, 1e4, rs)
    base = np.array([1e4 ** (-2 * j / 8) for j in range(4)])
    np.testing.assert_allclose(inv, np.concatenate([base[:1], base[1:] / 10.0]), rtol=1e-13)


def test_inv_freq_matches_numpy_port_other_sizes():
    for d, theta, rs in [(8, 1e4, RopeScaling(factor=4.0, original_max_position_embeddings=16, beta_fast=4.0)),
                         (32, 5e4, RopeScaling(factor=8.0, original_max_position_embeddings=1024)),
                         (128, 1e6, RopeScaling(factor=16.0, original_max_position_embeddings=8192))]:
        np.testing.assert_allclose(yarn_inv_freq(d, theta, rs), ref.inv_freq(d, theta, rs), rtol=1e-13)


@pytest.mark.parametrize("mscale, mscale_all_dim", [(1.0, 1.0), (1.0, 0.5)])
def test_apply_rope_is_complex_rotation_of_interleaved_pairs(mscale, mscale_all_dim):
    rs = dict(factor=4.0, original_max_position_embeddings=16, beta_fast=4.0, beta_slow=1.0, mscale=mscale,
              mscale_all_dim=mscale_all_dim)
    cfg = tiny_config(rope_scaling=rs)
    dr = cfg.qk_rope_head_dim
    rng = np.random.default_rng(0)
    B, T, N = 2, 7, 3
    pos = np.stack([np.arange(T), np.arange(T) * 13 + 5])  # two different position rows, some > L0
    x = rng.normal(size=(B, T, N, dr)).astype(np.float32)
    cos, sin = rope_tables(cfg, jnp.asarray(pos))
    assert cos.shape == (B, T, dr // 2) and cos.dtype == jnp.float32
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    freqs = ref.inv_freq(dr, cfg.rope_theta, cfg.rope_scaling)
    factor = ref.rope_cos_factor(cfg.rope_scaling)
    want = ref.rope_complex(x, pos[:, :, None, None] * freqs, factor)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # HF factor mscale/mscale_all_dim: 1 for V3, (0.1 ln4 + 1) / (0.05 ln4 + 1) for the second case.
    hand = (0.1 * mscale * math.log(4) + 1) / (0.1 * mscale_all_dim * math.log(4) + 1)
    assert rope_attention_factor(cfg) == pytest.approx(hand, rel=1e-12)
    # Interleaved layout, not half-rotation: a unit vector on channel 0 at position p turns into
    # (cos, sin) on channels (0, 1), channels d/2.. untouched.
    e0 = np.zeros((1, 1, 1, dr), np.float32)
    e0[..., 0] = 1.0
    p = 3
    c1, s1 = rope_tables(cfg, jnp.full((1, 1), p))
    y = np.asarray(apply_rope(jnp.asarray(e0), c1, s1))[0, 0, 0]
    want0 = np.zeros(dr)
    want0[0], want0[1] = factor * math.cos(p * freqs[0]), factor * math.sin(p * freqs[0])
    np.testing.assert_allclose(y, want0, atol=1e-6)


def test_rope_preserves_norms_and_is_relative():
    cfg = tiny_config(qk_rope_head_dim=16, rope_scaling=dict(factor=4.0, original_max_position_embeddings=16))
    dr = cfg.qk_rope_head_dim
    rng = np.random.default_rng(1)
    q = rng.normal(size=dr).astype(np.float32)
    k = rng.normal(size=dr).astype(np.float32)
    T = 24
    pos = jnp.arange(T)[None]
    cos, sin = rope_tables(cfg, pos)
    qs = np.asarray(apply_rope(jnp.broadcast_to(jnp.asarray(q), (1, T, 1, dr)), cos, sin))[0, :, 0]  # [T, dr]
    ks = np.asarray(apply_rope(jnp.broadcast_to(jnp.asarray(k), (1, T, 1, dr)), cos, sin))[0, :, 0]
    # Rotation: the norm of every pair (and so of the vector) is unchanged.
    pair = lambda a: np.hypot(a[..., 0::2], a[..., 1::2])  # noqa: E731
    np.testing.assert_allclose(pair(qs), np.broadcast_to(pair(q), (T, dr // 2)), rtol=1e-5)
    # <R_m q, R_n k> depends only on m - n.
    dots = qs @ ks.T  # [m, n]
    for delta in (0, 1, 5, -3, 17):
        vals = [dots[m, m - delta] for m in range(T) if 0 <= m - delta < T]
        np.testing.assert_allclose(vals, vals[0], rtol=1e-4, atol=1e-5)
    # ...and does depend on it (otherwise the test above could not fail).
    assert abs(dots[5, 5] - dots[6, 5]) > 1e-3
