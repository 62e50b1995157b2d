"""Blockwise (flash) causal attention in plain JAX: memory O(T x block), not O(T^2), forward and backward.

The reference is the einsum core of `mla.MLA.expanded` (scores [B, N, T, T] in float32, softmax, @ v); this
computes the same numbers block by block with an online softmax (FlashAttention-2's order: Dao 2023,
arXiv:2307.08691) and a hand-written backward that recomputes each block's probabilities from the saved
log-sum-exp instead of keeping them. XLA sees loops over [B, N, block_q, block_k] tiles, so the program's
temporaries stay at a few tiles per layer at any sequence length; blocks above the causal diagonal are skipped,
not masked (one `scan` over the tiles at or below the diagonal, a static table), so the work is the causal half.

    out = blockwise_attention(q, k, v, scale=..., block_q=512, block_k=512, segment_ids=None)

q [B, T, N, Dq], k [B, T, N, Dq], v [B, T, N, Dv] -> [B, T, N, Dv] in v's dtype. Query t attends keys s <= t
(and, given `segment_ids` [B, T] int, only keys of its own segment: packed documents that do not attend
across). T need not divide by the blocks (the tail is padded; padded keys sit after every real query and are
causally masked, padded queries are dropped). Scores, the softmax and every accumulator are float32; the
probabilities meet v (and, in the backward, the gradients meet q, k, v) in the inputs' dtype, as flash kernels do.

`Runtime.attention='blockwise'` selects it (the 'auto' choice on TPU, where no cuDNN exists);
`tests/test_blockwise_attention.py` checks values and gradients against the einsum reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32
NEG = float(jnp.finfo(F32).min)


def reference_attention(q, k, v, *, scale: float, segment_ids=None) -> jax.Array:
    """The plain form (scores for every pair): what the blockwise form must equal."""
    T = q.shape[1]
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=F32) * scale
    mask = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    probs = jax.nn.softmax(jnp.where(mask, scores, NEG), axis=-1)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, v.astype(F32)).astype(v.dtype)


def blockwise_attention(q, k, v, *, scale: float, block_q: int = 512, block_k: int = 512,
                        segment_ids=None) -> jax.Array:
    T = q.shape[1]
    bq, bk = min(block_q, T), min(block_k, T)
    block = bq * bk // _gcd(bq, bk)  # both block sizes divide the padded length
    Tp = -(-T // block) * block
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    if Tp != T:
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, Tp - T)), constant_values=-1)
    out = _flash(q, k, v, segment_ids.astype(jnp.int32), scale=float(scale), bq=bq, bk=bk)
    return out[:, :T]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _tile_mask(i, j, bq, bk, seg_q, seg_k):
    """[B, 1, bq, bk]: causal within the tile of query block i and key block j, and same segment."""
    qpos = i * bq + jnp.arange(bq)
    kpos = j * bk + jnp.arange(bk)
    causal = qpos[:, None] >= kpos[None, :]
    return causal[None, None] & (seg_q[:, None, :, None] == seg_k[:, None, None, :])


def _slice(x, start, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _tiles(nq: int, nk: int, bq: int, bk: int, by_key: bool) -> jax.Array:
    """The (query block, key block) pairs at or below the causal diagonal, as a static [P, 2] table: grouped by
    query block (the forward) or by key block (the backward). One `scan` walks it, so the loop has a static trip
    count (XLA's cost analysis and `aot.jaxpr_flops` see the real work) and no tile above the diagonal is run."""
    pairs = [(i, j) for i in range(nq) for j in range(nk) if j * bk <= (i + 1) * bq - 1]
    if by_key:
        pairs.sort(key=lambda p: (p[1], p[0]))
    return jnp.asarray(pairs, jnp.int32)


def _forward(q, k, v, seg, scale, bq, bk):
    """out [B, T, N, Dv] (v's dtype) and the log-sum-exp [B, N, T] float32."""
    B, T, N, _ = q.shape
    Dv = v.shape[-1]

    def tile(carry, ij):
        m, l, acc, out, lse = carry
        i, j = ij[0], ij[1]
        first = j == 0
        m, l, acc = jnp.where(first, NEG, m), jnp.where(first, 0.0, l), jnp.where(first, 0.0, acc)
        qi, seg_q = _slice(q, i * bq, bq), _slice(seg, i * bq, bq)
        kj, vj, seg_k = _slice(k, j * bk, bk), _slice(v, j * bk, bk), _slice(seg, j * bk, bk)
        s = jnp.einsum("BTNH,BSNH->BNTS", qi, kj, preferred_element_type=F32) * scale
        mask = _tile_mask(i, j, bq, bk, seg_q, seg_k)
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, NEG), axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)  # [B, N, bq, bk]
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("BNTS,BSNH->BTNH", p.astype(v.dtype), vj, preferred_element_type=F32)
        acc = acc * jnp.swapaxes(corr, 1, 2)[..., None] + pv
        # the query block's result so far; its last tile writes the final one
        l_safe = jnp.where(l > 0, l, 1.0)  # a padded query row that saw no key
        out = jax.lax.dynamic_update_slice_in_dim(
            out, (acc / jnp.swapaxes(l_safe, 1, 2)[..., None]).astype(out.dtype), i * bq, axis=1)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, m_new + jnp.log(l_safe), i * bq, axis=2)
        return (m_new, l, acc, out, lse), None

    init = (jnp.full((B, N, bq), NEG, F32), jnp.zeros((B, N, bq), F32), jnp.zeros((B, bq, N, Dv), F32),
            jnp.zeros((B, T, N, Dv), v.dtype), jnp.zeros((B, N, T), F32))
    (_, _, _, out, lse), _ = jax.lax.scan(tile, init, _tiles(T // bq, T // bk, bq, bk, by_key=False))
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, seg, scale, bq, bk):
    return _forward(q, k, v, seg, scale, bq, bk)[0]


def _flash_fwd(q, k, v, seg, scale, bq, bk):
    out, lse = _forward(q, k, v, seg, scale, bq, bk)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(scale, bq, bk, res, dout):
    """Key blocks outer, query blocks inner: a key block's dk, dv accumulate over its tiles in float32 (and are
    written at each, the last write final), dq accumulates over all tiles in float32."""
    q, k, v, seg, out, lse = res
    B, T, N, Dq = q.shape
    Dv, dt = v.shape[-1], q.dtype
    delta = jnp.einsum("BTNH,BTNH->BNT", dout.astype(F32), out.astype(F32))  # rowsum(dO * O)
    dout = dout.astype(v.dtype)
    first_query_block = lambda j: (j * bk) // bq  # noqa: E731 (the first that sees key block j)

    def tile(carry, ij):
        dk_j, dv_j, dq, dk, dv = carry
        i, j = ij[0], ij[1]
        first = i == first_query_block(j)
        dk_j, dv_j = jnp.where(first, 0.0, dk_j), jnp.where(first, 0.0, dv_j)
        qi, seg_q, doi = _slice(q, i * bq, bq), _slice(seg, i * bq, bq), _slice(dout, i * bq, bq)
        kj, vj, seg_k = _slice(k, j * bk, bk), _slice(v, j * bk, bk), _slice(seg, j * bk, bk)
        lse_i, delta_i = _slice(lse, i * bq, bq, axis=2), _slice(delta, i * bq, bq, axis=2)
        s = jnp.einsum("BTNH,BSNH->BNTS", qi, kj, preferred_element_type=F32) * scale
        p = jnp.where(_tile_mask(i, j, bq, bk, seg_q, seg_k), jnp.exp(s - lse_i[..., None]), 0.0)
        dv_j = dv_j + jnp.einsum("BNTS,BTNH->BSNH", p.astype(dt), doi, preferred_element_type=F32)
        dp = jnp.einsum("BTNH,BSNH->BNTS", doi, vj, preferred_element_type=F32)
        ds = (p * (dp - delta_i[..., None]) * scale).astype(dt)
        dk_j = dk_j + jnp.einsum("BNTS,BTNH->BSNH", ds, qi, preferred_element_type=F32)
        dq_i = _slice(dq, i * bq, bq) + jnp.einsum("BNTS,BSNH->BTNH", ds, kj, preferred_element_type=F32)
        dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, axis=1)
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j.astype(dk.dtype), j * bk, axis=1)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j.astype(dv.dtype), j * bk, axis=1)
        return (dk_j, dv_j, dq, dk, dv), None

    init = (jnp.zeros((B, bk, N, Dq), F32), jnp.zeros((B, bk, N, Dv), F32), jnp.zeros(q.shape, F32),
            jnp.zeros(k.shape, k.dtype), jnp.zeros(v.shape, v.dtype))
    (_, _, dq, dk, dv), _ = jax.lax.scan(tile, init, _tiles(T // bq, T // bk, bq, bk, by_key=True))
    return dq.astype(q.dtype), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
