"""The blockwise (flash) attention core (`Runtime.attention='blockwise'`, the 'auto' choice on TPU) against a
float64 numpy softmax attention (values) and the einsum core (gradients, itself checked against numpy in
test_mla), with tiles smaller than the sequence, a length that no tile divides, and packed segments; inside MLA
against the numpy MLA; and the property it exists for: no [T, T] array anywhere in its forward or backward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import runtime
from dsv3_jax.blockwise_attention import blockwise_attention, reference_attention
from dsv3_jax.mla import MLA
from dsv3_jax.rope import rope_tables

from reference import build, tiny_config, to_numpy
from reference import numpy_ref as ref


def numpy_attention(q, k, v, scale, segment_ids=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T = q.shape[1]
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    mask = np.tril(np.ones((T, T), bool))[None, None]
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _inputs(B=2, T=37, N=3, Dq=12, Dv=8, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k = jax.random.normal(ks[0], (B, T, N, Dq)), jax.random.normal(ks[1], (B, T, N, Dq))
    v = jax.random.normal(ks[2], (B, T, N, Dv))
    seg = jnp.asarray(np.repeat([[0] * 15 + [1] * 9 + [2] * 13], B, 0), jnp.int32)  # three packed documents
    return q, k, v, seg, jax.random.normal(ks[3], (B, T, N, Dv))


@pytest.mark.parametrize("blocks", [(8, 8), (16, 8), (8, 16), (5, 7), (64, 64)])
@pytest.mark.parametrize("packed", [False, True])
def test_values_and_gradients_match_the_plain_form(blocks, packed):
    q, k, v, seg, w = _inputs()
    seg = seg if packed else None
    bq, bk = blocks

    def blockwise(q, k, v):
        return blockwise_attention(q, k, v, scale=0.3, block_q=bq, block_k=bk, segment_ids=seg)

    out = jax.jit(blockwise)(q, k, v)
    want = numpy_attention(q, k, v, 0.3, seg)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda *a: (blockwise(*a) * w).sum(), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.grad(lambda *a: (reference_attention(*a, scale=0.3, segment_ids=seg) * w).sum(),
                     argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6)


def test_bfloat16_inputs_stay_close_to_float64():
    q, k, v, _, _ = _inputs(T=64, seed=1)
    out = blockwise_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), scale=0.3, block_q=16, block_k=16)
    assert out.dtype == jnp.bfloat16
    want = numpy_attention(*(np.asarray(a.astype(jnp.bfloat16), np.float64) for a in (q, k, v)), 0.3)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=3e-2)


def test_no_square_score_array_in_forward_or_backward():
    """At T = 256 with tiles of 32, no value of the jitted gradient program has two axes of length T: the
    einsum core's program does (the check can fail)."""
    T = 256
    q, k, v, _, _ = _inputs(B=1, T=T, N=2, Dq=8, Dv=8)

    def square_arrays(f):
        jaxpr = jax.make_jaxpr(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(q, k, v)
        found = []

        def walk(jx):
            for eqn in jx.eqns:
                for var in eqn.outvars:
                    if list(getattr(var.aval, "shape", ())).count(T) >= 2:
                        found.append((eqn.primitive.name, var.aval.shape))
                for sub in _subjaxprs(eqn):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return found

    assert not square_arrays(lambda q, k, v: blockwise_attention(q, k, v, scale=0.3, block_q=32, block_k=32))
    assert square_arrays(lambda q, k, v: reference_attention(q, k, v, scale=0.3))


def _subjaxprs(eqn):
    """The jaxprs inside an equation's parameters (loop bodies, custom_vjp functions, pjit)."""
    for p in eqn.params.values():
        for x in p if isinstance(p, (list, tuple)) else (p,):
            if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr
            elif hasattr(x, "eqns"):
                yield x


def test_mla_with_blockwise_core_matches_numpy():
    """MLA (q_lora, k_pe shared by the heads, 192/128-like unequal head dims) with tiles of 4 over T = 11."""
    cfg = tiny_config(num_attention_heads=4, qk_nope_head_dim=8, v_head_dim=4, kv_lora_rank=12)
    rt = dataclasses.replace(runtime.resolve(attention="blockwise"), attention_block=4)
    mla = build(lambda r: MLA(cfg, rngs=r, runtime=rt), seed=7)
    B, T = 2, 11
    x = np.random.default_rng(3).normal(size=(B, T, cfg.hidden_size)).astype(np.float32)
    pos = np.arange(T)
    cos, sin = rope_tables(cfg, jnp.broadcast_to(jnp.asarray(pos), (B, T)))
    got = nnx.jit(lambda m, x: m(x, cos, sin))(mla, jnp.asarray(x))
    want = ref.mla(x, to_numpy(mla), cfg, positions=pos)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_only_tiles_at_or_below_the_diagonal_run():
    """T = 64 in tiles of 16: 10 of the 16 tiles are run, and the loop's trip count is static, so the package's
    FLOP counter (what the AOT report scales XLA's figures by) sees exactly their matmuls."""
    from dsv3_jax.aot import jaxpr_flops

    B, T, N, Dq, Dv = 1, 64, 2, 8, 4
    q, k, v, _, _ = _inputs(B=B, T=T, N=N, Dq=Dq, Dv=Dv)
    jaxpr = jax.make_jaxpr(lambda q, k, v: blockwise_attention(q, k, v, scale=0.3, block_q=16, block_k=16))(q, k, v)
    assert jaxpr_flops(jaxpr) == 10 * 2 * B * N * 16 * 16 * (Dq + Dv)
