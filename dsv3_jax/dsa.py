"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): the lightning indexer and the top-k key selection it drives.

In every layer of a V3.2 model (`ModelConfig.index_topk > 0`) the indexer scores every earlier key for each query,
and MLA attends only to the `index_topk` keys scored highest (all of them while there are no more than that):

    q      = wq_b(q_lat)                            [B, T, H, Dh]   (q_lat: MLA's normed query latent)
    k      = LayerNorm(wk(x))                       [B, S, Dh]      (one key per token, shared by the H heads)
    q, k   : RoPE on the first qk_rope_head_dim channels, rotate-half pairs (i, i + d/2) (MLA's own RoPE
             turns interleaved pairs; transformers' DeepseekV32Indexer and DeepSeek's code do the same)
    w      = weights_proj(x) * H^-0.5               [B, T, H]
    score  = sum_h w[h] * relu(Dh^-0.5 * q[h] . k)  [B, T, S] float32
    keep   = the index_topk largest scores among the keys s <= t (ties: the lower index, as lax.top_k)

Defaults H = 64, Dh = 128, index_topk = 2048 (V3.2's config.json). DeepSeek's kernels apply a Hadamard rotation
and FP8 to q and k before scoring; the rotation is orthogonal (it leaves q . k unchanged) and the FP8 is a
precision choice, so this computes the scores in the compute dtype with float32 accumulation, as transformers does.

`tests/test_dsa.py`: index_topk >= T equals dense MLA exactly; transformers' DeepseekV32ForCausalLM (tiny, random,
index_topk < T so the selection decides the result) gives the same logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Einsum, LayerNorm

F32 = jnp.float32


def rope_half(x: jax.Array, cos: jax.Array, sin: jax.Array, dims: int) -> jax.Array:
    """Rotate-half RoPE on the first `dims` channels of x [B, T, (H,) D] by cos/sin [B, T, dims/2] (the frequency
    tables MLA uses): pairs (i, i + dims/2); float32 math."""
    xf = x.astype(F32)
    rot, rest = xf[..., :dims], xf[..., dims:]
    a, b = rot[..., : dims // 2], rot[..., dims // 2:]
    if x.ndim == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    y = jnp.concatenate([a * cos - b * sin, b * cos + a * sin, rest], axis=-1)
    return y.astype(x.dtype)


class Indexer(nnx.Module):
    """The lightning indexer of one layer (weights as V3.2's `self_attn.indexer.*`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, Q, H, Dh = cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim
        kw = dict(std=cfg.initializer_range, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.wq_b = Einsum("BTQ,QHK->BTHK", (Q, H, Dh), ("q_lora", "index_heads", "index_head_dim"), **kw)
        self.wk = Einsum("BTD,DK->BTK", (D, Dh), ("embed", "index_head_dim"), **kw)
        self.k_norm = LayerNorm(Dh, 1e-6, axis_name="index_head_dim", param_dtype=cfg.weight_dtype, rngs=rngs)
        self.weights_proj = Einsum("BTD,DH->BTH", (D, H), ("embed", "index_heads"), **kw)

    def keys(self, x, cos, sin) -> jax.Array:
        """The index key of each token: x [B, T, D] -> [B, T, Dh] (what a cache keeps beside the latent)."""
        return rope_half(self.k_norm(self.wk(x)), cos, sin, self.cfg.qk_rope_head_dim)

    def queries(self, x, q_lat, cos, sin) -> tuple[jax.Array, jax.Array]:
        """(q [B, T, H, Dh], per-head weights [B, T, H] float32) of the queries."""
        q = rope_half(self.wq_b(q_lat), cos, sin, self.cfg.qk_rope_head_dim)
        w = self.weights_proj(x).astype(F32) * self.cfg.index_n_heads ** -0.5
        return q, w

    def scores(self, q, w, k) -> jax.Array:
        """sum_h w[h] relu(Dh^-0.5 q[h] . k[s]): q [B, T, H, Dh], w [B, T, H], k [B, S, Dh] -> [B, T, S] float32."""
        s = jnp.einsum("BTHK,BSK->BTHS", q, k.astype(q.dtype), preferred_element_type=F32)
        s = jax.nn.relu(s * self.cfg.index_head_dim ** -0.5)
        return jnp.einsum("BTH,BTHS->BTS", w, s)


def topk_keep(scores: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """keep [B, T, S] bool: the k highest `scores` [B, T, S] among the `valid` keys of each query (all of them
    where there are no more than k)."""
    S = scores.shape[-1]
    if k >= S:
        return valid
    masked = jnp.where(valid, scores, -jnp.inf)
    _, idx = jax.lax.top_k(masked, k)  # [B, T, k]
    chosen = jnp.zeros(scores.shape, jnp.bool_)
    B, T = scores.shape[:2]
    chosen = chosen.at[jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None], idx].set(True)
    return chosen & valid


def sparse_latent_attention(q_abs, q_pe, c_kv, k_pe, q_idx, w, k_idx, indexer: Indexer, *, topk: int, scale: float,
                            block: int, segment_ids=None) -> jax.Array:
    """Sparse attention block by block in the latent (absorbed) form, memory O(T x topk), not O(T^2):

        for each block of `block` queries: the indexer's scores against every key [B, block, S], the top-k keys
        among the causal ones, their latents gathered [B, block, topk, R + dr], and a softmax over those only.

    q_abs [B, T, N, R] (W_UK absorbed), q_pe [B, T, N, dr], c_kv [B, T, R], k_pe [B, T, dr], the indexer's q_idx
    [B, T, H, Dh], w [B, T, H], k_idx [B, T, Dh] -> o_lat [B, T, N, R] float32 (times W_UV gives the heads'
    outputs). The same numbers as the plain form (`topk_keep` as a [T, T] mask over the expanded heads) up to
    summation order; each block is rematerialised in the backward. `segment_ids` [B, T] (packed documents): keys of
    another document are never chosen."""
    B, T, N, R = q_abs.shape
    bq = min(block, T)
    Tp = -(-T // bq) * bq
    k = min(topk, T)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    q_abs, q_pe, q_idx, w = pad(q_abs), pad(q_pe), pad(q_idx), pad(w)
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
    seg_q = pad(seg)
    keys = jnp.concatenate([c_kv, k_pe.astype(c_kv.dtype)], axis=-1)  # [B, T, R + dr]
    rows = jnp.arange(B)[:, None, None]

    @jax.checkpoint
    def one_block(i):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * bq, bq, 1)  # noqa: E731
        qa, qp = sl(q_abs), sl(q_pe)
        scores = indexer.scores(sl(q_idx), sl(w), k_idx)  # [B, bq, T]
        qpos = i * bq + jnp.arange(bq)
        valid = (qpos[:, None] >= jnp.arange(T)[None, :])[None] & (sl(seg_q)[:, :, None] == seg[:, None, :])
        _, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)  # [B, bq, k]
        chosen = jnp.take_along_axis(valid, idx, axis=-1)  # fewer than k valid keys: the rest are dropped
        sel = keys[rows, idx]  # [B, bq, k, R + dr]
        c_sel, pe_sel = sel[..., :R], sel[..., R:]
        s = jnp.einsum("BTNR,BTKR->BTNK", qa, c_sel.astype(qa.dtype), preferred_element_type=F32)
        s += jnp.einsum("BTNH,BTKH->BTNK", qp, pe_sel.astype(qp.dtype), preferred_element_type=F32)
        s = jnp.where(chosen[:, :, None, :], s * scale, jnp.finfo(F32).min)
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("BTNK,BTKR->BTNR", p.astype(qa.dtype), c_sel.astype(qa.dtype), preferred_element_type=F32)

    out = jax.lax.map(one_block, jnp.arange(Tp // bq))  # [nb, B, bq, N, R]
    return jnp.moveaxis(out, 0, 1).reshape(B, Tp, N, R)[:, :T]


# ---------------------------------------------------------------------------------------------- training
def indexer_terms(logits, index_scores, causal, keep, warmup: bool):
    """The indexer's training terms for a block of queries (DeepSeek-V3.2 report, section 2.1):

        dense warm-up   target p_t = mean over heads of softmax(logits over the causal keys)  (the dense attention)
                        KL(p_t || softmax(I_t over the causal keys))
        sparse          target p_t = mean over heads of softmax(logits over the kept keys)    (the sparse attention)
                        KL(p_t || softmax(I_t over the kept keys))
        recall_t        = the dense attention's mass (mean over heads) inside the kept keys

    logits [B, N, T, S] float32: the main attention's scaled scores, before any mask (detached here); index_scores
    [B, T, S]: the indexer's (its gradient is the KL's); causal [T, S] or [B, T, S]; keep [B, T, S] (the top-k
    among the causal keys). -> (kl [B, T], recall [B, T]) float32, recall without gradient. The target is detached:
    the indexer learns the attention's distribution, the attention does not learn the indexer's."""
    f32 = jnp.float32
    neg = jnp.finfo(f32).min
    logits = jax.lax.stop_gradient(logits.astype(f32))
    causal = jnp.broadcast_to(causal, keep.shape)
    dense = jax.nn.softmax(jnp.where(causal[:, None], logits, neg), axis=-1).mean(1)  # [B, T, S]
    recall = jnp.where(keep, dense, 0.0).sum(-1)
    if warmup:
        target, allowed = dense, causal
    else:
        target, allowed = jax.nn.softmax(jnp.where(keep[:, None], logits, neg), axis=-1).mean(1), keep
    target = jnp.where(allowed, target, 0.0)
    log_q = jax.nn.log_softmax(jnp.where(allowed, index_scores.astype(f32), neg), axis=-1)
    pos = target > 0
    log_t = jnp.log(jnp.where(pos, target, 1.0))
    kl = jnp.where(pos, target * (log_t - jnp.where(pos, log_q, 0.0)), 0.0).sum(-1)
    return kl, jax.lax.stop_gradient(recall)


def indexer_terms_blockwise(q_abs, q_pe, c_kv, k_pe, q_idx, w, k_idx, indexer: Indexer, *, topk: int, scale: float,
                            block: int, warmup: bool, segment_ids=None):
    """`indexer_terms` block by block over the queries, with the attention's logits in the latent form (q_abs . c_kv
    + q_pe . k_pe, the same numbers as the expanded form's): memory O(block x T) per block, never [T, T]. Inputs as
    `sparse_latent_attention`'s -> (mean KL, mean recall) over the B x T queries."""
    B, T, N, R = q_abs.shape
    bq = min(block, T)
    nb = -(-T // bq)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, nb * bq - T)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
    stop = jax.lax.stop_gradient
    q_abs, q_pe, q_idx, w = pad(stop(q_abs)), pad(stop(q_pe)), pad(q_idx), pad(w)
    c_kv, k_pe = stop(c_kv), stop(k_pe)
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids
    seg_q = pad(seg)

    @jax.checkpoint
    def one_block(i):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, i * bq, bq, 1)  # noqa: E731
        qa, qp = sl(q_abs), sl(q_pe)
        logits = jnp.einsum("BTNR,BSR->BNTS", qa, c_kv.astype(qa.dtype), preferred_element_type=F32)
        logits += jnp.einsum("BTNH,BSH->BNTS", qp, k_pe.astype(qp.dtype), preferred_element_type=F32)
        scores = indexer.scores(sl(q_idx), sl(w), k_idx)  # [B, bq, T]
        qpos = i * bq + jnp.arange(bq)
        causal = (qpos[:, None] >= jnp.arange(T)[None, :])[None] & (sl(seg_q)[:, :, None] == seg[:, None, :])
        keep = topk_keep(jax.lax.stop_gradient(scores), causal, topk)
        kl, recall = indexer_terms(logits * scale, scores, causal, keep, warmup)
        real = (qpos < T)[None, :]
        return jnp.where(real, kl, 0.0).sum(), jnp.where(real, recall, 0.0).sum()

    kl, recall = jax.lax.map(one_block, jnp.arange(nb))
    return kl.sum() / (B * T), recall.sum() / (B * T)
