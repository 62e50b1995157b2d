"""Multi-head latent attention (MLA): the training path, the absorbed decode path and its latent cache
(REFERENCE.md section 2).

Shape legend: B batch, T query length, S key length (the cache capacity in decode), D model, N heads,
Q q_lora_rank, R kv_lora_rank, dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim, L stacked layers.

Training path (`__call__`, and `prefill`, which also returns the latent it computed):
    q          = wq_b(RMSNorm(wq_a(x)))  (or wq(x) when q_lora_rank is None)  -> [B, T, N, dn + dr]
    c_kv, k_pe = wkv_a(x)                                                     -> [B, T, R], [B, T, dr]
    c_kv       = RMSNorm(c_kv)
    k_nope, v  = wkv_b(c_kv)                                                  -> [B, T, N, dn], [B, T, N, dv]
    q_pe, k_pe = RoPE(q_pe), RoPE(k_pe)      (k_pe is ONE head shared by all N heads)
    scores     = (q_nope . k_nope + q_pe . k_pe) * scale,  causal softmax in float32
    out        = wo(softmax @ v)

Absorbed decode path (`decode`): split wkv_b [R, N, dn + dv] into W_UK [R, N, dn] and W_UV [R, N, dv].
Because k_nope = c_kv W_UK and v = c_kv W_UV are linear in the latent,
    q_nope . k_nope[s] = (W_UK q_nope) . c_kv[s]           q_abs = einsum('BTNH,RNH->BTNR')   [B, T, N, R]
    softmax @ v        = W_UV (softmax @ c_kv)              o_lat = einsum('BNTS,BSR->BTNR')  [B, T, N, R]
so attention reads only the cache, c_kv [B, S, R] and roped k_pe [B, S, dr]: R + dr values per token per
layer (576 for DeepSeek-V3, against N (dn + dr + dv) = 40,960 for a multi-head K/V cache), and no
[B, S, N, *] key or value tensor is ever formed (`tests/test_infer.py` checks the jaxpr for that).
The scores are the same numbers as the training path's, summed in a different order.

`LatentCache` is that cache: fixed capacity S (static shapes, so one decode step compiles once), a
configurable dtype, and per-row write positions, so rows of one batch may sit at different lengths.
A slot s is attended by a query at position p iff s <= p; slots past a row's length hold stale values
(padding, rejected drafts) that are masked out and later overwritten, which is what makes "roll back"
free for speculative decoding.

FP8-resident weights (`Runtime.fp8_weights`): every projection is an FP8 GEMM (`dsv3_jax.fp8.resident`);
the absorbed path dequantises wkv_b per layer per step (`absorbed_kv_b`).

Dtypes: projections run in the compute dtype; scores, softmax and the probability-weighted sum
accumulate in float32. In decode the cached latent is read in the compute dtype (bfloat16 on
accelerators), stored in the cache dtype. Weights are stored "in -> out" for einsums (the HF
checkpoint's [out, in] matrices are transposed by the converter).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dsv3_jax import runtime as runtime_lib
from dsv3_jax.blockwise_attention import blockwise_attention
from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.data import packing
from dsv3_jax.dsa import Indexer, indexer_terms, indexer_terms_blockwise, sparse_latent_attention, topk_keep
from dsv3_jax.fp8.resident import QWeight
from dsv3_jax.layers import Einsum, RMSNorm
from dsv3_jax.rope import apply_rope
from dsv3_jax.runtime import Runtime

# Logical axis names of the cache arrays, mapped to mesh axes by dsv3_jax.sharding.RULES (batch -> the
# data-parallel axes; cache_length and the latent are replicated). k_pe's rope axis has no rule of its
# own and is never sharded, so it stays unnamed (None).
CACHE_AXES = {"c_kv": ("batch", "cache_length", "kv_lora"), "k_pe": ("batch", "cache_length", None)}


@struct.dataclass
class LatentCache:
    """Absorbed-MLA cache of one layer ([B, S, *]) or of a stack of layers ([L, B, S, *])."""

    c_kv: jax.Array  # [(L,) B, S, R]  RMS-normalised latent
    k_pe: jax.Array  # [(L,) B, S, dr] roped shared key

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, capacity: int, dtype, layers: int | None = None) -> LatentCache:
        lead = () if layers is None else (layers,)
        return cls(c_kv=jnp.zeros(lead + (batch, capacity, cfg.kv_lora_rank), dtype),
                   k_pe=jnp.zeros(lead + (batch, capacity, cfg.cache_rope_width), dtype))

    @staticmethod
    def logical_axes(stacked: bool) -> LatentCache:
        lead = ("layers",) if stacked else ()
        return LatentCache(c_kv=lead + CACHE_AXES["c_kv"], k_pe=lead + CACHE_AXES["k_pe"])

    @property
    def capacity(self) -> int:
        return self.c_kv.shape[-2]

    def fill(self, c_kv: jax.Array, k_pe: jax.Array) -> LatentCache:
        """Write [(L,) B, T, *] latents into slots [0, T) (prefill)."""
        start = (0,) * self.c_kv.ndim
        return LatentCache(c_kv=jax.lax.dynamic_update_slice(self.c_kv, c_kv.astype(self.c_kv.dtype), start),
                           k_pe=jax.lax.dynamic_update_slice(self.k_pe, k_pe.astype(self.k_pe.dtype), start))

    def write(self, positions: jax.Array, c_kv: jax.Array, k_pe: jax.Array, layer=None) -> LatentCache:
        """Write c_kv [B, T, R], k_pe [B, T, dr] at slots positions [B, T] (of stacked layer `layer`)."""
        rows = jnp.arange(positions.shape[0])[:, None]
        idx = (rows, positions) if layer is None else (layer, rows, positions)
        # mode='drop': a finished row that keeps stepping in a batch may point one slot past the end
        return LatentCache(c_kv=self.c_kv.at[idx].set(c_kv.astype(self.c_kv.dtype), mode="drop"),
                           k_pe=self.k_pe.at[idx].set(k_pe.astype(self.k_pe.dtype), mode="drop"))

    def layer(self, layer=None) -> tuple[jax.Array, jax.Array]:
        """(c_kv [B, S, R], k_pe [B, S, dr]) of one layer (`layer=None`: an unstacked cache)."""
        if layer is None:
            return self.c_kv, self.k_pe
        return self.c_kv[layer], self.k_pe[layer]

    def attend(self, q_abs, q_pe, positions, layer=None, *, scale: float, impl: str = "jnp",
               keep=None) -> jax.Array:
        """The absorbed core over slots s <= positions[b, t] (and, given keep [B, T, S], only those it keeps)
        -> o_lat [B, T, N, R] f32 (`impl` is for paged caches; a dense cache has one read)."""
        c_kv, k_pe = self.layer(layer)
        mask = jnp.arange(self.capacity)[None, None, :] <= positions[:, :, None]  # [B, T, S]
        if keep is not None:
            mask = mask & keep
        return latent_attention(q_abs, q_pe, c_kv, k_pe[..., : q_pe.shape[-1]], mask, scale)

    def key_channels(self, layer=None) -> jax.Array:
        """The cached k_pe entries [B, S, cache_rope_width] (the indexer's keys follow the rope channels)."""
        return self.layer(layer)[1]


def latent_attention(q_abs, q_pe, c_kv, k_pe, mask, scale) -> jax.Array:
    """Masked softmax over the latent: q_abs [B, T, N, R], q_pe [B, T, N, dr], c_kv [B, S, R], k_pe [B, S, dr],
    mask [B, T, S] -> o_lat [B, T, N, R] float32 (inputs in q_abs's dtype, f32 accumulation)."""
    f32, dt = jnp.float32, q_abs.dtype
    c_kv, k_pe = c_kv.astype(dt), k_pe.astype(dt)
    scores = jnp.einsum("BTNR,BSR->BNTS", q_abs, c_kv, preferred_element_type=f32)
    scores += jnp.einsum("BTNH,BSH->BNTS", q_pe.astype(dt), k_pe, preferred_element_type=f32)
    scores *= scale
    scores = jnp.where(mask[:, None], scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, N, T, S] float32
    return jnp.einsum("BNTS,BSR->BTNR", probs.astype(dt), c_kv, preferred_element_type=f32)


def causal_mask(T: int, segment_ids=None) -> jax.Array:
    """[T, T] key s <= query t, and with `segment_ids` [B, T] (packed documents) [B, T, T]: in the same document."""
    causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    return causal if segment_ids is None else causal[None] & packing.same_document(segment_ids)


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime | None = None):
        self.cfg = cfg
        self.runtime = runtime or runtime_lib.default()
        D, N, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        kw = dict(std=cfg.initializer_range, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs,
                  fp8=self.runtime.fp8_gemms, fp8_weights=self.runtime.fp8_resident)
        lora = self.runtime.lora
        ad = lambda name: dict(kw, lora=lora.on(name) if lora else None)  # noqa: E731  (LoRA targets, lora.py)
        nkw = dict(param_dtype=cfg.weight_dtype, rngs=rngs)
        if cfg.q_lora_rank is None:
            self.wq = Einsum("BTD,DNH->BTNH", (D, N, dn + dr), ("embed", "heads", "qk_head_dim"), **ad("wq"))
        else:
            Q = cfg.q_lora_rank
            self.wq_a = Einsum("BTD,DQ->BTQ", (D, Q), ("embed", "q_lora"), **ad("wq_a"))
            self.q_norm = RMSNorm(Q, cfg.rms_norm_eps, axis_name="q_lora", **nkw)
            self.wq_b = Einsum("BTQ,QNH->BTNH", (Q, N, dn + dr), ("q_lora", "heads", "qk_head_dim"), **ad("wq_b"))
        self.wkv_a = Einsum("BTD,DR->BTR", (D, R + dr), ("embed", "kv_lora"), **ad("wkv_a"))
        self.kv_norm = RMSNorm(R, cfg.rms_norm_eps, axis_name="kv_lora", **nkw)
        self.wkv_b = Einsum("BTR,RNH->BTNH", (R, N, dn + dv), ("kv_lora", "heads", "kv_head_dim"), **ad("wkv_b"))
        self.wo = Einsum("BTNH,NHD->BTD", (N, dv, D), ("heads", "v_head_dim", "embed"), **ad("wo"))
        if cfg.dsa:  # DeepSeek Sparse Attention (V3.2): the lightning indexer picks each query's keys (dsa.py)
            self.indexer = Indexer(cfg, rngs=rngs)

    def queries(self, x, cos, sin):
        """q_nope [B, T, N, dn], roped q_pe [B, T, N, dr], and the normed query latent q_lat [B, T, Q] (None
        without q_lora)."""
        if self.cfg.q_lora_rank is None:
            q, q_lat = self.wq(x), None
        else:
            q_lat = self.q_norm(self.wq_a(x))
            q = self.wq_b(q_lat)
        q_nope, q_pe = jnp.split(q, [self.cfg.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rope(q_pe, cos, sin), q_lat

    def sparse_keep(self, x, q_lat, cos, sin, k_idx, valid) -> jax.Array:
        """DSA's selection: keep [B, T, S], each query's index_topk keys scored highest by the indexer among the
        `valid` [B, T, S] ones (x [B, T, D] and q_lat give the queries, k_idx [B, S, Dh] are the keys)."""
        q, w = self.indexer.queries(x, q_lat, cos, sin)
        scores = self.indexer.scores(q, w, k_idx)
        return topk_keep(scores, jnp.broadcast_to(valid, scores.shape), self.cfg.index_topk)

    def latent(self, x, cos, sin):
        """Normalised latent c_kv [B, T, R] and roped shared key k_pe [B, T, dr]."""
        kv = self.wkv_a(x)
        c_kv, k_pe = jnp.split(kv, [self.cfg.kv_lora_rank], axis=-1)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin)[:, :, 0, :]
        return self.kv_norm(c_kv), k_pe

    # ------------------------------------------------------------------ training path / prefill
    def expanded(self, q_nope, q_pe, c_kv, k_pe, dtype, keep=None, segment_ids=None) -> jax.Array:
        """Causal attention with K/V expanded from the latent: [B, T, *] -> [B, T, D]. The core is the einsum
        below (the reference) or, per `Runtime.attention`, the blockwise (flash) form in plain JAX ('blockwise',
        `blockwise_attention.py`: no [T, T] scores in memory) or `jax.nn.dot_product_attention` ('xla', 'cudnn').
        `keep` [B, T, T] (sparse attention's selection, causal already): the einsum core with that mask.
        `segment_ids` [B, T] (packed documents, `data/packing.py`): no query attends to another document's keys
        (every core: 'xla' / 'cudnn' take it as a [B, 1, T, T] mask beside their causal one)."""
        cfg = self.cfg
        k_nope, v = jnp.split(self.wkv_b(c_kv), [cfg.qk_nope_head_dim], axis=-1)  # [B, S, N, dn], [B, S, N, dv]
        dense = keep is None  # sparse attention's selection is a [T, T] mask: the einsum core applies it (no
        if dense and self.runtime.attention == "blockwise":  # blockwise sparse core yet)
            q, k = self.full_heads(q_nope, q_pe, k_nope, k_pe)
            block = self.runtime.attention_block
            out = blockwise_attention(q, k, v, scale=cfg.softmax_scale, block_q=block, block_k=block,
                                      segment_ids=segment_ids)
            return self.wo(out.astype(dtype))
        if dense and self.runtime.attention != "einsum":
            out = self.fused_core(q_nope, q_pe, k_nope, k_pe, v, segment_ids)
            if out is not None:
                return self.wo(out.astype(dtype))
        f32 = jnp.float32
        scores = jnp.einsum("BTNH,BSNH->BNTS", q_nope, k_nope, preferred_element_type=f32)
        scores += jnp.einsum("BTNH,BSH->BNTS", q_pe, k_pe, preferred_element_type=f32)
        scores *= cfg.softmax_scale
        T = q_nope.shape[1]
        allowed = causal_mask(T, segment_ids) if keep is None else keep
        scores = jnp.where(allowed[:, None] if allowed.ndim == 3 else allowed, scores, jnp.finfo(f32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("BNTS,BSNH->BTNH", probs, v.astype(f32)).astype(dtype)  # [B, T, N, dv]
        return self.wo(out)

    def full_heads(self, q_nope, q_pe, k_nope, k_pe):
        """q = [q_nope, q_pe], k = [k_nope, k_pe shared by the heads]: [B, T, N, dn + dr] each."""
        N = self.cfg.num_attention_heads
        q = jnp.concatenate([q_nope, q_pe.astype(q_nope.dtype)], axis=-1)
        k_pe = jnp.broadcast_to(k_pe[:, :, None, :], k_pe.shape[:2] + (N, k_pe.shape[-1])).astype(k_nope.dtype)
        return q, jnp.concatenate([k_nope, k_pe], axis=-1)

    def fused_core(self, q_nope, q_pe, k_nope, k_pe, v, segment_ids=None) -> jax.Array | None:
        """softmax(q.k * scale, causal) v by `jax.nn.dot_product_attention` (cuDNN: flash attention, no [T, T]
        scores in memory; MLA's qk head dim 192 differs from v's 128, which cuDNN runs from Hopper and 9.10 on):
        q = [q_nope, q_pe], k = [k_nope, k_pe shared by the heads] -> [B, T, N, dv]. None when 'auto' chose
        cuDNN and cuDNN refuses these shapes or dtype (the einsum runs); an explicit 'cudnn' raises. `segment_ids`
        [B, T]: packed documents, a [B, 1, T, T] same-document mask beside the causal one."""
        rt = self.runtime
        q, k = self.full_heads(q_nope, q_pe, k_nope, k_pe)
        mask = None if segment_ids is None else packing.same_document(segment_ids)[:, None]

        def core(v):
            return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=self.cfg.softmax_scale, is_causal=True,
                                                implementation=rt.attention)

        try:
            try:
                return core(v)
            except ValueError:  # a jax whose API wants one head dim for q, k and v: v padded with zeros
                dv = v.shape[-1]
                if dv >= q.shape[-1]:
                    raise
                return core(jnp.pad(v, ((0, 0),) * 3 + ((0, q.shape[-1] - dv),)))[..., :dv]
        except (NotImplementedError, RuntimeError, ValueError) as e:
            if rt.attention_fallback:
                return None
            raise UserError(f"attention={rt.attention!r} cannot run here ({' '.join(str(e).split())[:200]}); use "
                            f"config.model.attention='auto' or 'einsum'") from None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids=None) -> jax.Array:
        """Causal self-attention over the whole sequence: x [B, T, D] -> [B, T, D] (within each document of
        `segment_ids` [B, T])."""
        return self.prefill(x, cos, sin, segment_ids)[0]

    def prefill(self, x, cos, sin, segment_ids=None):
        """The training path, also returning the latent it used: out [B, T, D], c_kv [B, T, R], k_pe [B, T, dr]."""
        with jax.named_scope("attention"):
            q_nope, q_pe, q_lat = self.queries(x, cos, sin)
            c_kv, k_pe = self.latent(x, cos, sin)
            if not self.cfg.dsa:
                return self.expanded(q_nope, q_pe, c_kv, k_pe, x.dtype, segment_ids=segment_ids), c_kv, k_pe
            T = x.shape[1]
            k_idx = self.indexer.keys(x, cos, sin)
            entry = jnp.concatenate([k_pe, k_idx.astype(k_pe.dtype)], axis=-1)  # (what a cache keeps)
            if self.runtime.attention == "blockwise":  # block by block in the latent form: no [T, T] array
                q_idx, w = self.indexer.queries(x, q_lat, cos, sin)
                return (self.sparse_blockwise(q_nope, q_pe, c_kv, k_pe, q_idx, w, k_idx, x.dtype, segment_ids), c_kv,
                        entry)
            keep = self.sparse_keep(x, q_lat, cos, sin, k_idx, causal_mask(T, segment_ids))
            return self.expanded(q_nope, q_pe, c_kv, k_pe, x.dtype, keep), c_kv, entry

    def train(self, x, cos, sin, segment_ids=None):
        """The training forward: (out [B, T, D], indexer KL, top-k recall), the last two means over the queries
        (zeros without sparse attention; `dsa.indexer_terms`). The indexer reads a detached copy of x and of the
        query latent, so it learns only from its KL and the model only from the language-model loss (V3.2's
        sparse stage; in the dense warm-up the attention is dense and only the indexer trains)."""
        if not self.cfg.dsa:
            z = jnp.zeros((), jnp.float32)
            return self(x, cos, sin, segment_ids), z, z
        cfg, rt = self.cfg, self.runtime
        warmup = rt.dsa_stage == "dense_warmup"
        with jax.named_scope("attention"):
            q_nope, q_pe, q_lat = self.queries(x, cos, sin)
            c_kv, k_pe = self.latent(x, cos, sin)
            xd, q_lat_d = jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_lat)
            k_idx = self.indexer.keys(xd, cos, sin)
            q_idx, w = self.indexer.queries(xd, q_lat_d, cos, sin)
            if rt.attention == "blockwise":  # no [T, T] array: the terms block by block in the latent form
                out = (self.expanded(q_nope, q_pe, c_kv, k_pe, x.dtype, segment_ids=segment_ids) if warmup
                       else self.sparse_blockwise(q_nope, q_pe, c_kv, k_pe, q_idx, w, k_idx, x.dtype, segment_ids))
                q_abs = self.absorbed_query(q_nope, x.dtype)
                kl, recall = indexer_terms_blockwise(q_abs, q_pe.astype(x.dtype), c_kv, k_pe, q_idx, w, k_idx,
                                                     self.indexer, topk=cfg.index_topk, scale=cfg.softmax_scale,
                                                     block=rt.attention_block, warmup=warmup, segment_ids=segment_ids)
                return out, kl, recall
            T = x.shape[1]
            scores = self.indexer.scores(q_idx, w, k_idx)  # [B, T, T]
            causal = jnp.broadcast_to(causal_mask(T, segment_ids), scores.shape)
            keep = topk_keep(jax.lax.stop_gradient(scores), causal, cfg.index_topk)
            out = self.expanded(q_nope, q_pe, c_kv, k_pe, x.dtype, None if warmup else keep, segment_ids)
            k_nope = jnp.split(self.wkv_b(c_kv), [cfg.qk_nope_head_dim], axis=-1)[0]
            logits = jnp.einsum("BTNH,BSNH->BNTS", q_nope, k_nope, preferred_element_type=jnp.float32)
            logits += jnp.einsum("BTNH,BSH->BNTS", q_pe, k_pe, preferred_element_type=jnp.float32)
            kl, recall = indexer_terms(logits * cfg.softmax_scale, scores, causal, keep, warmup)
            return out, kl.mean(), recall.mean()

    def absorbed_query(self, q_nope, dtype) -> jax.Array:
        """q_abs = W_UK q_nope [B, T, N, R] in `dtype` (the latent form's query)."""
        w_uk = jnp.split(self.absorbed_kv_b(dtype), [self.cfg.qk_nope_head_dim], axis=-1)[0]
        return jnp.einsum("BTNH,RNH->BTNR", q_nope, w_uk, preferred_element_type=jnp.float32).astype(dtype)

    def sparse_blockwise(self, q_nope, q_pe, c_kv, k_pe, q_idx, w, k_idx, dt, segment_ids=None) -> jax.Array:
        """Sparse attention of the training path in the absorbed form, block by block (`dsa.sparse_latent_attention`:
        memory O(T x index_topk)), the indexer's queries q_idx, w and keys k_idx given: -> [B, T, D]."""
        cfg, f32 = self.cfg, jnp.float32
        w_uv = jnp.split(self.absorbed_kv_b(dt), [cfg.qk_nope_head_dim], axis=-1)[1]  # [R, N, dv]
        o_lat = sparse_latent_attention(self.absorbed_query(q_nope, dt), q_pe.astype(dt), c_kv, k_pe, q_idx, w, k_idx,
                                        self.indexer, topk=cfg.index_topk, scale=cfg.softmax_scale,
                                        block=self.runtime.attention_block, segment_ids=segment_ids)
        out = jnp.einsum("BTNR,RNH->BTNH", o_lat.astype(dt), w_uv, preferred_element_type=f32)
        return self.wo(out.astype(dt))

    # ------------------------------------------------------------------ absorbed decode path
    def absorbed_kv_b(self, dtype) -> jax.Array:
        """wkv_b as [R, N, dn + dv] in `dtype`, to split into W_UK and W_UV. FP8-resident weights are
        dequantised here from their 128x128 blocks, one layer at a time inside the decode step (what
        DeepSeek's inference code does in its absorbed mode): the resident copy stays FP8."""
        if self.wkv_b.fp8_weights is None:
            return self.wkv_b.weight().astype(dtype)
        qw = self.wkv_b.qweight  # [N, dn + dv, R] e4m3 and [ceil(N (dn + dv) / 128), ceil(R / 128)] scales
        N, H, R = qw.q.shape
        w = QWeight(qw.q.reshape(N * H, R), qw.s).dequantize(dtype)  # [N*H, R]
        return w.reshape(N, H, R).transpose(2, 0, 1)

    def absorbed(self, q_nope, q_pe, cache, positions, layer, dtype, keep=None) -> jax.Array:
        """Attention over the latent cache with W_UK absorbed into the query and W_UV into the output.

        q_nope [B, T, N, dn], q_pe [B, T, N, dr] at positions [B, T]; the cache (dense or paged) runs the core
        (`attend`: slots s <= position) -> [B, T, D].
        """
        cfg = self.cfg
        dt, f32 = cfg.compute_dtype, jnp.float32
        if self.runtime.attention_f32_core:  # XLA:CPU cannot run some bf16 x bf16 -> f32 dots (DotThunk): the
            dt = jnp.promote_types(dt, f32)  # resolver keeps this core in f32 there (bf16 inputs: less rounding)
        w_uk, w_uv = jnp.split(self.absorbed_kv_b(dt), [cfg.qk_nope_head_dim], axis=-1)  # [R, N, dn|dv]
        q_abs = jnp.einsum("BTNH,RNH->BTNR", q_nope.astype(dt), w_uk, preferred_element_type=f32).astype(dt)
        o_lat = cache.attend(q_abs, q_pe.astype(dt), positions, layer, scale=cfg.softmax_scale,
                             impl=self.runtime.paged_attention, keep=keep)  # [B, T, N, R] float32
        out = jnp.einsum("BTNR,RNH->BTNH", o_lat.astype(dt), w_uv, preferred_element_type=f32)  # [B, T, N, dv]
        return self.wo(out.astype(dtype))

    def decode(self, x, cos, sin, cache: LatentCache, positions: jax.Array, layer=None):
        """x [B, T, D] at positions [B, T] (consecutive per row): write their latents into the cache at those
        slots, attend over slots s <= position. Returns (out [B, T, D], cache)."""
        with jax.named_scope("attention"):
            q_nope, q_pe, q_lat = self.queries(x, cos, sin)
            c_new, k_new = self.latent(x, cos, sin)
            if self.cfg.dsa:  # the indexer's key is cached beside the rope key
                k_new = jnp.concatenate([k_new, self.indexer.keys(x, cos, sin).astype(k_new.dtype)], axis=-1)
            cache = cache.write(positions, c_new, k_new, layer)
            keep = None
            if self.cfg.dsa:
                k_idx = cache.key_channels(layer)[..., self.cfg.qk_rope_head_dim:]  # [B, S, Dh]
                valid = jnp.arange(k_idx.shape[1])[None, None, :] <= positions[:, :, None]
                keep = self.sparse_keep(x, q_lat, cos, sin, k_idx.astype(x.dtype), valid)
            return self.absorbed(q_nope, q_pe, cache, positions, layer, x.dtype, keep), cache
