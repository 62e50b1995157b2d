"""DeepSeek-V3: embed -> dense blocks -> MoE blocks -> RMSNorm -> lm_head, plus the MTP chain.

Shape legend: B batch, T tokens, D model, V vocabulary, E routed experts, L stacked layers; in the cache
S capacity (slots per row), R kv_lora_rank, dr qk_rope_head_dim.

Block (pre-norm):  x += MLA(RMSNorm(x));  x += FFN(RMSNorm(x)),  FFN = SwiGLU (first
`first_k_dense_replace` layers) or DeepSeekMoE (the rest).

Homogeneous layers are stacked: the dense blocks form one `Block` whose parameters carry a leading
'layers' axis (created with `nnx.vmap`), the MoE blocks another, and each stack is applied with
`jax.lax.scan`, so compile time does not grow with depth (the 61-layer model lowers as 2 layer bodies).

Multi-token prediction (REFERENCE.md section 4), depth k = 1..D, h^0 = final-normed main hidden state:
    h'_i  = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])      (embedding FIRST)
    h^k   = Block_k(h')                                            (an MoE block when the model has MoE)
    mtp_logits[k-1][i] = lm_head(norm_k(h^k_i))   predicts token i + k + 1
Embedding and head are shared with the main model. Positions with i + k >= T see a padding token
and must be masked out of the MTP loss (see `mtp_valid_mask`).

`DeepSeekV3(tokens)` returns `ModelOutput(logits [B, T, V] f32, mtp_logits (D x [B, T, V]), moe_stats)`;
`moe_stats` maps each MoE module's path ("moe_layers/ffn", "mtp/0/block/ffn", ...) to its `LayerStats`
(`layer_stats.py`), and `expert_counts` [MoE layers (main stack, then MTP blocks), E], `balance_loss` and
`dropped_tokens` are read from it.

How the model runs is its `Runtime` (`runtime.py`), passed at construction (default: this backend, one
device): each stack runs with the Runtime's stack strategy (a `lax.scan`, or the pipeline over 'stage')
and each MoE layer with its expert strategy (a single-device layout, or expert parallelism);
`with_runtime(model, rt)` gives the same parameters under another Runtime (e.g. the decode layout).

Inference (cache-aware forwards over a `ModelCache`, the absorbed-MLA latent cache of every layer; S is
its fixed capacity, see `mla.py`):
    init_cache(B, S, dtype, mtp)                     zeros: [L, B, S, R] + [L, B, S, dr] per stack (+ MTP layer)
    prefill(tokens [B, T], cache)                    training-path attention over positions 0..T-1, latents
                                                     written to slots [0, T) -> logits, final-normed h, cache
    decode(tokens [B, T], positions [B, T], cache)   absorbed attention over the cache (T = 1, or 2 to verify a draft)
    mtp_prefill / mtp_decode(h, next_tokens, ...)    the first MTP module on its own cache: position i reads
                                                     (h_i, Emb(t_{i+1})) and predicts t_{i+2} (the speculative draft)
MoE layers route each token with the same `MoE` module (and so the same router) as the training path;
the Runtime picks only the expert layout (`Runtime.for_decode()`: 'dense' is cheapest at decode sizes on CPU).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dsv3_jax import experts, layer_stats, param_kinds, strategies
from dsv3_jax import runtime as runtime_lib
from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.data import packing
from dsv3_jax.layer_stats import LayerStats
from dsv3_jax.layers import MLP, Einsum, Embed, RMSNorm, normal, param
from dsv3_jax.mla import MLA, LatentCache
from dsv3_jax.moe import MoE, RouterBias
from dsv3_jax.rope import rope_tables
from dsv3_jax.runtime import Runtime
from dsv3_jax.sharding import constrain


@struct.dataclass
class ModelOutput:
    logits: jax.Array  # [B, T, V] float32
    mtp_logits: tuple  # D arrays [B, T, V]; depth k position i predicts token i + k + 1
    moe_stats: dict  # MoE module path -> LayerStats ([L, ...] for the stacked main layers)
    indexer_kl: jax.Array = None  # DSA: mean over every block (main and MTP) of the indexer's KL (0 without DSA)
    index_recall: jax.Array = None  # DSA: mean over every block of the top-k keys' share of the dense attention
    num_experts: int = struct.field(pytree_node=False, default=0)

    @property
    def expert_counts(self) -> jax.Array:
        """[n_moe_layers, E] float32 tokens routed to each expert: main stack rows, then the MTP blocks."""
        return layer_stats.stacked_counts(self.moe_stats, self.num_experts)

    @property
    def balance_loss(self) -> jax.Array:
        """Scalar: mean over MoE layers of the sequence-wise balance loss (no alpha)."""
        return layer_stats.mean_balance(self.moe_stats)

    @property
    def dropped_tokens(self) -> jax.Array:
        """Scalar: token-expert rows dropped by expert capacity, summed over MoE layers."""
        return layer_stats.total_dropped(self.moe_stats)


class Block(nnx.Module):
    """One pre-norm transformer block: MLA then a dense SwiGLU or a DeepSeekMoE FFN."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs, runtime: Runtime | None = None):
        runtime = runtime or runtime_lib.default()
        D = cfg.hidden_size
        nkw = dict(axis_name="embed", param_dtype=cfg.weight_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(D, cfg.rms_norm_eps, **nkw)
        self.attn = MLA(cfg, rngs=rngs, runtime=runtime)
        self.ffn_norm = RMSNorm(D, cfg.rms_norm_eps, **nkw)
        self.is_moe = moe
        if moe:
            self.ffn = MoE(cfg, rngs=rngs, runtime=runtime)
        else:
            self.ffn = MLP(D, cfg.intermediate_size, std=cfg.initializer_range, dtype=cfg.compute_dtype,
                           param_dtype=cfg.weight_dtype, rngs=rngs, fp8=runtime.fp8_gemms,
                           fp8_weights=runtime.fp8_resident,
                           lora=runtime.lora.on("dense_ffn") if runtime.lora else None)
        self.num_experts = cfg.n_routed_experts

    def __call__(self, x, cos, sin, segment_ids=None):
        """The training forward: x [B, T, D] -> (x, LayerStats: the FFN's (zeros for a dense one) and the attention's
        indexer terms (zeros without sparse attention)); `segment_ids` [B, T]: packed documents."""
        a, kl, recall = self.attn.train(self.attn_norm(x), cos, sin, segment_ids)
        x, stats = self.feed_forward(x + a)
        return x, stats.with_indexer(kl, recall)

    def feed_forward(self, x):
        """x + FFN(RMSNorm(x)) -> (x, LayerStats (zeros for a dense FFN))."""
        h = self.ffn_norm(x)
        if self.is_moe:
            y, stats = self.ffn(h)
        else:
            with jax.named_scope("dense_ffn"):
                y, stats = self.ffn(h), LayerStats.zeros(self.num_experts)
        return x + y, stats

    def prefill(self, x, cos, sin):
        """Training-path block that also returns its attention latent: x, c_kv [B, T, R], k_pe [B, T, dr]."""
        a, c_kv, k_pe = self.attn.prefill(self.attn_norm(x), cos, sin)
        x = self.feed_forward(x + a)[0]
        return x, c_kv, k_pe

    def decode(self, x, cos, sin, cache: LatentCache, positions, layer=None):
        """Absorbed-attention block over the latent cache (layer `layer` of a stacked one): -> x, cache."""
        a, cache = self.attn.decode(self.attn_norm(x), cos, sin, cache, positions, layer)
        x = self.feed_forward(x + a)[0]
        return x, cache


def stacked_blocks(cfg: ModelConfig, n: int, moe: bool, rngs: nnx.Rngs, runtime: Runtime | None = None) -> Block:
    """n Blocks with parameters stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, moe=moe, rngs=r, runtime=runtime)

    return make(rngs)


def scan_prefill(stack: Block, x, cos, sin):
    """Prefill a stacked Block: x [B, T, D] -> x, c_kv [L, B, T, R], k_pe [L, B, T, dr]."""
    graphdef, state = nnx.split(stack)

    def body(h, layer_state):
        h, c_kv, k_pe = nnx.merge(graphdef, layer_state).prefill(h, cos, sin)
        return h, (c_kv, k_pe)

    x, (c_kv, k_pe) = jax.lax.scan(body, x, state, unroll=stack.attn.runtime.unroll_layers)
    return x, c_kv, k_pe


def scan_decode(stack: Block, x, cos, sin, cache: LatentCache, positions, layers=None):
    """Decode through a stacked Block with its stacked cache [L, B, S, *] in the loop carry, so each layer
    writes only its new slots in place. `layers`: the stack's per-layer states, already sliced by the caller
    (`DeepSeekV3.layer_states`, outside its loop over tokens); the layers then run one after the other from them.
    -> x [B, T, D], cache."""
    graphdef, state = nnx.split(stack)
    if layers is not None:
        for i, layer_state in enumerate(layers):
            x, cache = nnx.merge(graphdef, layer_state).decode(x, cos, sin, cache, positions, layer=i)
        return x, cache

    def body(carry, xs):
        h, cache = carry
        layer_state, i = xs
        h, cache = nnx.merge(graphdef, layer_state).decode(h, cos, sin, cache, positions, layer=i)
        return (h, cache), None

    (x, cache), _ = jax.lax.scan(body, (x, cache), (state, jnp.arange(cache.c_kv.shape[0])),
                                 unroll=stack.attn.runtime.unroll_layers)
    return x, cache


@struct.dataclass
class ModelCache:
    """Latent caches of the whole model: one stacked cache per layer stack, plus the first MTP module's."""

    dense: LatentCache | None  # [first_k_dense_replace, B, S, *]
    moe: LatentCache | None  # [MoE layers, B, S, *]
    mtp: LatentCache | None  # [B, S, *] (speculative decoding only)

    @staticmethod
    def logical_axes(cache: ModelCache) -> ModelCache:
        """Logical axis names of each array (a ModelCache of name tuples), for `dsv3_jax.sharding`."""
        return ModelCache(dense=None if cache.dense is None else LatentCache.logical_axes(True),
                          moe=None if cache.moe is None else LatentCache.logical_axes(True),
                          mtp=None if cache.mtp is None else LatentCache.logical_axes(False))

    @property
    def capacity(self) -> int:
        return next(c for c in (self.dense, self.moe, self.mtp) if c is not None).capacity


class MTPModule(nnx.Module):
    """One multi-token-prediction depth: combine shifted embedding and previous hidden, one block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime | None = None):
        D = cfg.hidden_size
        nkw = dict(axis_name="embed", param_dtype=cfg.weight_dtype, rngs=rngs)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, **nkw)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, **nkw)
        self.eh_proj = Einsum("BTC,CD->BTD", (2 * D, D), ("mtp_concat", "embed"), std=cfg.initializer_range,
                              dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.block = Block(cfg, moe=cfg.has_moe, rngs=rngs, runtime=runtime)
        self.norm = RMSNorm(D, cfg.rms_norm_eps, **nkw)

    def __call__(self, h_prev, emb_next, cos, sin, segment_ids=None):
        return self.block(self.combine(h_prev, emb_next), cos, sin, segment_ids)

    def combine(self, h_prev, emb_next):
        """eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]): [B, T, D] x 2 -> [B, T, D]."""
        return self.eh_proj(jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1))


def head_logits(cfg: ModelConfig, lm_head, h: jax.Array) -> jax.Array:
    """Final-normed hidden [B, T, D] -> float32 logits [B, T, V] (the head shared by the model and MTP)."""
    dt = cfg.compute_dtype
    return jnp.einsum("BTD,DV->BTV", h.astype(dt), lm_head[...].astype(dt), preferred_element_type=jnp.float32)


def model_tail(m, x: jax.Array, tokens: jax.Array, cos, sin, segment_ids=None):
    """What follows the blocks: final norm and head, then the MTP chain. `m` has the model's `cfg`, `embed`,
    `norm`, `lm_head` and `mtp` (the model itself, or a pipeline's last stage holding just those).
    -> (logits [B, T, V], mtp_logits (D x [B, T, V]), {MTP block's FFN path: LayerStats}) (the MTP blocks are MoE
    blocks when the model has MoE: `moe_only` keeps those stats)."""
    cfg = m.cfg
    B = tokens.shape[0]
    h = m.norm(x)
    logits = head_logits(cfg, m.lm_head, h)
    mtp_logits, stats = [], {}
    for k, module in enumerate(m.mtp, start=1):
        shifted = jnp.concatenate([tokens[:, k:], jnp.zeros((B, k), tokens.dtype)], axis=1)
        with jax.named_scope(f"mtp_{k}"):
            h, st = module(h, m.embed(shifted), cos, sin, segment_ids)
        stats[f"mtp/{k - 1}/block/ffn"] = st
        mtp_logits.append(head_logits(cfg, m.lm_head, module.norm(h)))
    return logits, tuple(mtp_logits), stats


def moe_only(cfg: ModelConfig, block_stats: dict) -> dict:
    """The stats of the MoE blocks among `block_stats` (FFN path -> LayerStats of every block): everything but the
    dense stack, when the model has MoE."""
    return {k: v for k, v in block_stats.items() if cfg.has_moe and not k.startswith("dense_layers")}


class DeepSeekV3(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime | None = None):
        self.cfg = cfg
        self.runtime = rt = runtime or runtime_lib.default()
        D, std = cfg.hidden_size, cfg.initializer_range
        self.embed = Embed(cfg.vocab_size, D, std=std, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                           rngs=rngs)
        self.dense_layers = (stacked_blocks(cfg, cfg.num_dense_layers, False, rngs, rt)
                             if cfg.num_dense_layers else None)
        self.moe_layers = stacked_blocks(cfg, cfg.num_moe_layers, True, rngs, rt) if cfg.num_moe_layers else None
        self.norm = RMSNorm(D, cfg.rms_norm_eps, axis_name="embed", param_dtype=cfg.weight_dtype, rngs=rngs)
        self.lm_head = param(rngs, normal(std), (D, cfg.vocab_size), ("embed", "vocab"), cfg.weight_dtype)
        self.mtp = nnx.List([MTPModule(cfg, rngs=rngs, runtime=rt) for _ in range(cfg.num_nextn_predict_layers)])

    def head(self, h: jax.Array) -> jax.Array:
        """Final-normed hidden [B, T, D] -> float32 logits [B, T, V]."""
        return head_logits(self.cfg, self.lm_head, h)

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> ModelOutput:
        """The training forward of tokens [B, T]; `segment_ids` [B, T] (packed documents, `data/packing.py`):
        positions restart at each document and attention stays inside it, so each document's logits are those
        of running it alone."""
        cfg = self.cfg
        B, T = tokens.shape
        positions = (jnp.broadcast_to(jnp.arange(T), (B, T)) if segment_ids is None
                     else packing.positions(segment_ids))
        cos, sin = rope_tables(cfg, positions)
        x = self.embed(tokens)
        run_stack = strategies.stack(self.runtime)
        block_stats = {}
        for name, stack in (("dense_layers", self.dense_layers), ("moe_layers", self.moe_layers)):
            if stack is not None:
                x = constrain(x, ("batch", "length", "act_embed"))
                with jax.named_scope(name):
                    x, block_stats[f"{name}/ffn"] = run_stack(stack, x, cos, sin, segment_ids)
        logits, mtp_logits, mtp_stats = model_tail(self, x, tokens, cos, sin, segment_ids)
        block_stats |= mtp_stats
        kl, recall = layer_stats.indexer_means(block_stats)
        return ModelOutput(logits=logits, mtp_logits=mtp_logits, moe_stats=moe_only(cfg, block_stats), indexer_kl=kl,
                           index_recall=recall, num_experts=cfg.n_routed_experts)

    # ------------------------------------------------------------------ inference (latent cache)
    def init_cache(self, batch: int, capacity: int, dtype=None, mtp: bool = False) -> ModelCache:
        """Zero cache of `capacity` slots per row; `mtp=True` adds the first MTP module's (speculative decoding)."""
        cfg = self.cfg
        dtype = cfg.compute_dtype if dtype is None else dtype
        if mtp and not len(self.mtp):
            raise UserError("this model has no MTP module (num_nextn_predict_layers=0): it cannot draft tokens "
                            "for speculative decoding")
        stack = lambda n: LatentCache.zeros(cfg, batch, capacity, dtype, layers=n) if n else None  # noqa: E731
        return ModelCache(dense=stack(cfg.num_dense_layers), moe=stack(cfg.num_moe_layers),
                          mtp=LatentCache.zeros(cfg, batch, capacity, dtype) if mtp else None)

    def prefill(self, tokens: jax.Array, cache: ModelCache):
        """Training-path forward of tokens [B, T] at positions 0..T-1, writing every layer's latent into
        cache slots [0, T). -> (logits [B, T, V] f32, final-normed hidden h [B, T, D], cache)."""
        B, T = tokens.shape
        self._check_fits(T, cache)
        cos, sin = rope_tables(self.cfg, jnp.broadcast_to(jnp.arange(T), (B, T)))
        x = self.embed(tokens)
        new = {}
        for name, stack in (("dense", self.dense_layers), ("moe", self.moe_layers)):
            if stack is not None:
                x, c_kv, k_pe = scan_prefill(stack, x, cos, sin)
                new[name] = getattr(cache, name).fill(c_kv, k_pe)
        h = self.norm(x)
        return self.head(h), h, cache.replace(**new)

    def layer_states(self, rows: int) -> dict | None:
        """Each layer stack's weights sliced into per-layer states ({'dense': [...], 'moe': [...]}) for `decode` of
        `rows` tokens per step, when the Runtime unrolls the stacks (CPU) and each step reads every routed expert
        (rows x top-k >= experts: the 'dense' layout); None otherwise. A decode loop over tokens takes them once,
        before the loop: sliced inside it, every layer's expert weights were copied again for every token (XLA
        leaves slices of loop-invariant weights inside a while loop), ~11% of the tiny config's decode time at
        batch 16. With fewer rows the chosen experts are gathered straight from the stacked weights, and slicing
        every expert once per dispatch would copy more than the steps read."""
        stacks = (("dense", self.dense_layers), ("moe", self.moe_layers))
        if not any(s is not None and s.attn.runtime.unroll_layers for _, s in stacks):
            return None
        if self.cfg.n_routed_experts and experts.fewer_rows_than_experts(rows, self.cfg.num_experts_per_tok,
                                                                        self.cfg.n_routed_experts):
            return None
        out = {}
        for name, stack in stacks:
            if stack is not None:
                state = nnx.state(stack)
                n = jax.tree.leaves(state)[0].shape[0]
                out[name] = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(n)]
        return out

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: ModelCache, layers: dict | None = None):
        """Absorbed-attention forward of tokens [B, T] at positions [B, T] (consecutive per row; slots
        before them must hold that row's earlier tokens); `layers`: `layer_states()`, taken before a loop over
        tokens. -> (logits [B, T, V] f32, h [B, T, D], cache)."""
        cos, sin = rope_tables(self.cfg, positions)
        x = self.embed(tokens)
        new = {}
        for name, stack in (("dense", self.dense_layers), ("moe", self.moe_layers)):
            if stack is not None:
                x, new[name] = scan_decode(stack, x, cos, sin, getattr(cache, name), positions,
                                           None if layers is None else layers[name])
        h = self.norm(x)
        return self.head(h), h, cache.replace(**new)

    def mtp_prefill(self, h: jax.Array, next_tokens: jax.Array, cache: ModelCache):
        """First MTP module over positions 0..T-1: h [B, T, D] main hidden, next_tokens [B, T] = t_{i+1}.
        -> (logits [B, T, V] predicting t_{i+2}, cache with the MTP layer's slots [0, T) filled)."""
        B, T = next_tokens.shape
        self._check_fits(T, cache)
        module = self.mtp[0]
        cos, sin = rope_tables(self.cfg, jnp.broadcast_to(jnp.arange(T), (B, T)))
        x, c_kv, k_pe = module.block.prefill(module.combine(h, self.embed(next_tokens)), cos, sin)
        return self.head(module.norm(x)), cache.replace(mtp=cache.mtp.fill(c_kv, k_pe))

    def mtp_decode(self, h, next_tokens, positions, cache: ModelCache):
        """First MTP module at positions [B, T] over its cache. -> (logits [B, T, V] predicting t_{i+2}, cache)."""
        module = self.mtp[0]
        cos, sin = rope_tables(self.cfg, positions)
        x, mtp_cache = module.block.decode(module.combine(h, self.embed(next_tokens)), cos, sin, cache.mtp,
                                           positions)
        return self.head(module.norm(x)), cache.replace(mtp=mtp_cache)

    def _check_fits(self, T: int, cache: ModelCache):
        if T > cache.capacity or T > self.cfg.max_position_embeddings:
            raise UserError(f"prefill of {T} tokens does not fit the cache ({cache.capacity} slots) or the model's "
                            f"context (max_position_embeddings={self.cfg.max_position_embeddings})")


def abstract_model(cfg: ModelConfig, runtime: Runtime | None = None) -> DeepSeekV3:
    """The model built abstractly (`nnx.eval_shape`): shapes, dtypes and logical axes, nothing allocated."""
    return nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=runtime))


def split_model(model: DeepSeekV3):
    """graphdef, params (pure dict), router biases (pure dict): the arrays train states and checkpoints hold."""
    graphdef, params, biases = nnx.split(model, nnx.Param, RouterBias)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(biases)


def with_runtime(model: DeepSeekV3, runtime: Runtime) -> DeepSeekV3:
    """The same parameters under another Runtime: a new module tree whose Variables hold the same arrays
    (nothing is copied) and whose modules run with `runtime`. The FP8 switch is fixed when the projections
    are built: a runtime that changes it needs a model built with it."""
    if runtime.fp8_gemms != model.runtime.fp8_gemms:
        raise UserError("with_runtime cannot switch the FP8 GEMMs of a built model; build DeepSeekV3(cfg, "
                        "runtime=...) with the new Runtime and merge the parameters into it")
    if runtime.fp8_resident != model.runtime.fp8_resident:
        raise UserError("with_runtime cannot switch FP8-resident weights (or their GEMM mode) of a built model; "
                        "load it again with the new Runtime")
    new = nnx.merge(*nnx.split(model))
    for _, module in nnx.iter_modules(new):
        if hasattr(module, "runtime"):
            module.runtime = runtime
    return new


def mtp_valid_mask(T: int, depth: int) -> jax.Array:
    """[T] bool: positions whose depth-k MTP prediction has a real target inside a window of T+1 tokens."""
    return jnp.arange(T) < T - depth


def param_counts(model: DeepSeekV3) -> dict:
    """Parameter counts from the module tree (works on an abstract `nnx.eval_shape` model).

    total: main model (everything but the MTP modules); mtp: the MTP modules' own parameters
    (embedding and head are shared, so not counted again); active: parameters used per token by the
    main model, counting embedding and head, with routed experts counted K/E of their size.
    """
    cfg = model.cfg
    total = mtp = routed = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = math.prod(int(d) for d in var.get_value().shape)
        if param_kinds.in_mtp(path):
            mtp += n
            continue
        total += n
        if param_kinds.param_kind(path) == "routed_experts":
            routed += n
    active = total - routed + routed * cfg.num_experts_per_tok // max(cfg.n_routed_experts, 1)
    return {"params_total": total, "params_mtp": mtp, "params_active": active}
