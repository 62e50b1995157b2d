"""Multi-head latent attention (MLA), training path (REFERENCE.md section 2).

Shape legend: B batch, T query length, S key length, D model, N heads, Q q_lora_rank,
R kv_lora_rank, dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim.

    q          = wq_b(RMSNorm(wq_a(x)))  (or wq(x) when q_lora_rank is None)  -> [B, T, N, dn + dr]
    c_kv, k_pe = wkv_a(x)                                                     -> [B, T, R], [B, T, dr]
    c_kv       = RMSNorm(c_kv)
    k_nope, v  = wkv_b(c_kv)                                                  -> [B, T, N, dn], [B, T, N, dv]
    q_pe, k_pe = RoPE(q_pe), RoPE(k_pe)      (k_pe is ONE head shared by all N heads)
    scores     = (q_nope . k_nope + q_pe . k_pe) * scale,  causal softmax in float32
    out        = wo(softmax @ v)

Dtypes: projections run in the compute dtype; scores, softmax and the probability-weighted sum
accumulate in float32. Weights are stored "in -> out" for einsums (the HF checkpoint's [out, in]
matrices are transposed by the converter). `latent()` exposes (c_kv, roped k_pe), the 576 values per
token that an absorbed-attention decode cache stores.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import Einsum, RMSNorm
from dsv3_jax.rope import apply_rope


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        kw = dict(std=cfg.initializer_range, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        nkw = dict(param_dtype=cfg.weight_dtype, rngs=rngs)
        if cfg.q_lora_rank is None:
            self.wq = Einsum("BTD,DNH->BTNH", (D, N, dn + dr), ("embed", "heads", "qk_head_dim"), **kw)
        else:
            Q = cfg.q_lora_rank
            self.wq_a = Einsum("BTD,DQ->BTQ", (D, Q), ("embed", "q_lora"), **kw)
            self.q_norm = RMSNorm(Q, cfg.rms_norm_eps, axis_name="q_lora", **nkw)
            self.wq_b = Einsum("BTQ,QNH->BTNH", (Q, N, dn + dr), ("q_lora", "heads", "qk_head_dim"), **kw)
        self.wkv_a = Einsum("BTD,DR->BTR", (D, R + dr), ("embed", "kv_lora"), **kw)
        self.kv_norm = RMSNorm(R, cfg.rms_norm_eps, axis_name="kv_lora", **nkw)
        self.wkv_b = Einsum("BTR,RNH->BTNH", (R, N, dn + dv), ("kv_lora", "heads", "kv_head_dim"), **kw)
        self.wo = Einsum("BTNH,NHD->BTD", (N, dv, D), ("heads", "v_head_dim", "embed"), **kw)

    def queries(self, x, cos, sin):
        """q_nope [B, T, N, dn], roped q_pe [B, T, N, dr]."""
        q = self.wq(x) if self.cfg.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = jnp.split(q, [self.cfg.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latent(self, x, cos, sin):
        """Normalised latent c_kv [B, T, R] and roped shared key k_pe [B, T, dr]."""
        kv = self.wkv_a(x)
        c_kv, k_pe = jnp.split(kv, [self.cfg.kv_lora_rank], axis=-1)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin)[:, :, 0, :]
        return self.kv_norm(c_kv), k_pe

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Causal self-attention over the whole sequence: x [B, T, D] -> [B, T, D]."""
        cfg = self.cfg
        q_nope, q_pe = self.queries(x, cos, sin)
        c_kv, k_pe = self.latent(x, cos, sin)
        k_nope, v = jnp.split(self.wkv_b(c_kv), [cfg.qk_nope_head_dim], axis=-1)  # [B, S, N, dn], [B, S, N, dv]
        f32 = jnp.float32
        scores = jnp.einsum("BTNH,BSNH->BNTS", q_nope, k_nope, preferred_element_type=f32)
        scores += jnp.einsum("BTNH,BSH->BNTS", q_pe, k_pe, preferred_element_type=f32)
        scores *= cfg.softmax_scale
        T = x.shape[1]
        causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
        scores = jnp.where(causal, scores, jnp.finfo(f32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("BNTS,BSNH->BTNH", probs, v.astype(f32)).astype(x.dtype)  # [B, T, N, dv]
        return self.wo(out)
