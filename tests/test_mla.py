"""MLA against a plain numpy multi-head attention built from the module's own weights (k = [k_nope;
k_pe broadcast to every head], causal softmax, scale (dn+dr)^-0.5 * mscale^2), and against the
absorbed-attention formulation that only reads the latent cache.

Tolerance: float32 module (matmul precision 'highest') against a float64 reference:
max |got - want| <= 1e-5 * max |want| (+1e-5 relative per element)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.config import RopeScaling
from dsv3_jax.mla import MLA
from dsv3_jax.rope import rope_tables

from reference import build, tiny_config, to_numpy
from reference import numpy_ref as ref

YARN = dict(factor=4.0, original_max_position_embeddings=16, beta_fast=4.0, beta_slow=1.0)


def assert_close(got, want, rel=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * np.abs(want).max())


def _setup(cfg, seed, B=2, T=9, offset=0):
    mla = build(lambda r: MLA(cfg, rngs=r), seed=seed)
    x = np.random.default_rng(seed + 100).normal(size=(B, T, cfg.hidden_size)).astype(np.float32)
    pos = np.arange(T) + offset
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.asarray(pos), (B, T)))
    return mla, x, pos, cos, sin


CASES = {
    "q_lora_yarn": dict(rope_scaling=YARN),
    "no_q_lora_yarn": dict(q_lora_rank=None, rope_scaling=YARN),
    "q_lora_no_yarn": dict(rope_scaling=None),
    "yarn_mscale_ratio": dict(rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}),
    "wide_heads": dict(num_attention_heads=4, qk_nope_head_dim=8, v_head_dim=4, kv_lora_rank=12,
                       rope_scaling=YARN),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mla_matches_numpy_attention(name):
    cfg = tiny_config(**CASES[name])
    mla, x, pos, cos, sin = _setup(cfg, seed=len(name), offset=3 if name == "wide_heads" else 0)
    p = to_numpy(mla)
    assert ("wq" in p) == (cfg.q_lora_rank is None)
    got = nnx.jit(lambda m, x, c, s: m(x, c, s))(mla, jnp.asarray(x), cos, sin)
    assert got.shape == x.shape and got.dtype == jnp.float32
    want = ref.mla(x, p, cfg, positions=pos)
    assert np.abs(want).mean() > 0.1  # weights large enough for wrong variants to show
    assert_close(got, want)


def test_mla_reference_is_discriminating():
    """The numpy reference differs clearly from plausible wrong variants, so the test above can fail."""
    cfg = tiny_config(rope_scaling=YARN)
    mla, x, pos, cos, sin = _setup(cfg, seed=7)
    p = to_numpy(mla)
    got = np.asarray(nnx.jit(lambda m, x, c, s: m(x, c, s))(mla, jnp.asarray(x), cos, sin))
    scale = np.abs(got).max()
    no_mscale = ref.mla(x, p, cfg.replace(rope_scaling=RopeScaling(
        **{**YARN, "mscale_all_dim": 0.0})), positions=pos)  # scale without mscale^2
    no_yarn = ref.mla(x, p, cfg.replace(rope_scaling=None), positions=pos)
    shifted = ref.mla(x, p, cfg, positions=pos + 1)  # RoPE is relative: a shift must NOT matter...
    assert np.abs(got - no_mscale).max() > 1e-2 * scale
    assert np.abs(got - no_yarn).max() > 1e-3 * scale
    assert_close(got, shifted)  # ...and it does not


@pytest.mark.parametrize("q_lora", [12, None])
def test_latent_and_absorbed_attention(q_lora):
    """latent() returns the normed c_kv and roped k_pe; absorbed attention over them equals the module."""
    cfg = tiny_config(q_lora_rank=q_lora, rope_scaling=YARN)
    mla, x, pos, cos, sin = _setup(cfg, seed=11)
    p = to_numpy(mla)

    @nnx.jit
    def parts(m, x, c, s):
        q_nope, q_pe, _ = m.queries(x, c, s)
        c_kv, k_pe = m.latent(x, c, s)
        return q_nope, q_pe, c_kv, k_pe, m(x, c, s)

    q_nope, q_pe, c_kv, k_pe, out = parts(mla, jnp.asarray(x), cos, sin)
    assert c_kv.shape == (2, 9, cfg.kv_lora_rank) and k_pe.shape == (2, 9, cfg.qk_rope_head_dim)
    assert cfg.latent_cache_values_per_token() == c_kv.shape[-1] + k_pe.shape[-1]
    want_c, want_k = ref.mla_latent(x, p, cfg, positions=pos)
    assert_close(c_kv, want_c)
    assert_close(k_pe, want_k)
    absorbed = ref.mla_absorbed(q_nope, q_pe, c_kv, k_pe, p["wkv_b"]["kernel"], p["wo"]["kernel"], cfg)
    assert_close(out, absorbed)


def test_fused_attention_core_matches_numpy_and_its_gradients():
    """attention='xla' (jax.nn.dot_product_attention: the path cuDNN flash attention takes on a GPU) gives the
    numpy reference's output and the einsum core's input and weight gradients; 'auto' on CPU is the einsum,
    and an explicit 'cudnn' without cuDNN fails in one line naming the key."""
    from dsv3_jax import runtime
    from dsv3_jax.cli import UserError

    cfg = tiny_config(num_attention_heads=4, qk_nope_head_dim=8, v_head_dim=4, kv_lora_rank=12, rope_scaling=YARN)
    assert runtime.resolve().attention == ("cudnn" if runtime.platform() == "gpu" else "einsum")
    mla, x, pos, cos, sin = _setup(cfg, seed=5)
    fused = build(lambda r: MLA(cfg, rngs=r, runtime=runtime.resolve(attention="xla")), seed=5)
    assert_close(nnx.jit(lambda m, x: m(x, cos, sin))(fused, jnp.asarray(x)),
                 ref.mla(x, to_numpy(mla), cfg, positions=pos))

    def grads(m):
        return nnx.grad(lambda m, x: (m(x, cos, sin) ** 2).sum(), argnums=(0, 1))(m, jnp.asarray(x))

    (g_ref, gx_ref), (g, gx) = grads(mla), grads(fused)
    assert_close(gx, gx_ref)
    for a, b in zip(jax.tree.leaves(nnx.state(g_ref)), jax.tree.leaves(nnx.state(g))):
        assert_close(b, a)
    if runtime.platform() != "gpu":
        strict = build(lambda r: MLA(cfg, rngs=r, runtime=runtime.resolve(attention="cudnn")), seed=5)
        with pytest.raises(UserError, match="attention='cudnn' cannot run here"):
            strict(jnp.asarray(x), cos, sin)
