"""DeepSeekMoE: sigmoid router with group-limited top-k and a selection-only bias, routed experts, shared
experts, per-expert loads and the sequence-wise balance loss (REFERENCE.md section 3).

Shape legend: B batch, T tokens per sequence, N = B*T tokens, D model, E routed experts, K top-k,
G groups, F expert ffn width.

Routing, per token (float32 throughout):
    s   = sigmoid(x @ Wg)                       scores [E]
    sc  = s + bias                              bias (RouterBias) is used for SELECTION ONLY
    group score = sum of the top-2 sc in each of G groups; keep the top `topk_group` groups
    idx = top-K of sc over the kept groups
    w   = s[idx] / sum(s[idx])  (norm_topk_prob)  * routed_scaling_factor
    y   = sum_k w_k * SwiGLU_{idx_k}(x) + shared(x)

The bias is a `RouterBias` variable, not a `Param`: the optimizer never sees it; the train step
moves it by gamma * sign(mean load - load) from the per-expert counts this layer returns.

How the routed experts are computed is the Runtime's expert strategy (`strategies.experts`): one of the
dropless single-device layouts of `experts.py` ('dense', 'blocks', 'ragged'), or expert parallelism
over the mesh axis 'expert' (`parallel/expert.py`, optionally with a capacity factor that drops rows).

Sequence-wise balance loss (per sequence, then averaged over the batch):
    f_i = E / (K T) * #tokens choosing i,   P_i = mean_t s_i / sum_j s_j,   L_bal = sum_i f_i P_i
It is returned unweighted in the layer's `LayerStats`; the trainer multiplies it by alpha.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax import runtime as runtime_lib
from dsv3_jax import sharding, strategies
from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8.resident import SCALE_SUFFIX, QWeight
from dsv3_jax.layer_stats import LayerStats
from dsv3_jax.layers import MLP, fp8_params, normal, param
from dsv3_jax.lora import EXPERT_SUFFIX, ExpertAdapter
from dsv3_jax.runtime import Runtime


class RouterBias(nnx.Variable):
    """The aux-loss-free selection bias (HF: e_score_correction_bias). Checkpointed, never optimised."""


def route(scores: jax.Array, bias: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """scores [N, E] (sigmoid, f32), bias [E] -> combine weights [N, K] f32, expert ids [N, K] int32."""
    N, E = scores.shape
    G = cfg.n_group
    sc = scores + bias
    if G > 1 and cfg.topk_group < G:
        grouped = sc.reshape(N, G, E // G)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        keep = jax.lax.top_k(group_scores, cfg.topk_group)[1]  # [N, topk_group]
        group_mask = jax.nn.one_hot(keep, G, dtype=jnp.bool_).any(axis=1)  # [N, G]
        sc = jnp.where(jnp.repeat(group_mask, E // G, axis=1), sc, -jnp.inf)
    idx = jax.lax.top_k(sc, cfg.num_experts_per_tok)[1]
    w = jnp.take_along_axis(scores, idx, axis=1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * cfg.routed_scaling_factor, idx.astype(jnp.int32)


class MoE(nnx.Module):
    """Router + routed experts + shared experts. x [B, T, D] -> (y [B, T, D], LayerStats: counts [E],
    balance loss, dropped token-expert rows (non-zero only with an expert capacity factor))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, runtime: Runtime | None = None):
        self.cfg = cfg
        self.runtime = runtime or runtime_lib.default()
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std, pdt = cfg.initializer_range, cfg.weight_dtype
        self.router = param(rngs, normal(std), (D, E), ("embed", "router_experts"), pdt)
        self.bias = RouterBias(jnp.zeros((E,), jnp.float32), out_sharding=("router_experts",), eager_sharding=False)
        if self.runtime.fp8_resident is None:
            self.w_gate = param(rngs, normal(std), (E, D, F), ("experts", "embed", "expert_mlp"), pdt)
            self.w_up = param(rngs, normal(std), (E, D, F), ("experts", "embed", "expert_mlp"), pdt)
            self.w_down = param(rngs, normal(std), (E, F, D), ("experts", "expert_mlp", "embed"), pdt)
        else:  # FP8-resident: [E, N, K] (the checkpoint's [out, in] per expert) + block scales
            kw = dict(lead=(E,), lead_axes=("experts",))
            self.w_gate, self.w_gate_scale = fp8_params(rngs, normal(std), (D,), (F,), ("embed",), ("expert_mlp",),
                                                        **kw)
            self.w_up, self.w_up_scale = fp8_params(rngs, normal(std), (D,), (F,), ("embed",), ("expert_mlp",), **kw)
            self.w_down, self.w_down_scale = fp8_params(rngs, normal(std), (F,), (D,), ("expert_mlp",), ("embed",),
                                                        **kw)
        self.adapted = self.runtime.lora is not None and self.runtime.lora.on("routed_experts") is not None
        if self.adapted:  # one LoRA adapter per expert on each weight (`lora.ExpertAdapter`)
            for n, shape, axes in (("w_gate", (E, D, F), ("experts", "embed", "expert_mlp")),
                                   ("w_up", (E, D, F), ("experts", "embed", "expert_mlp")),
                                   ("w_down", (E, F, D), ("experts", "expert_mlp", "embed"))):
                setattr(self, n + EXPERT_SUFFIX, ExpertAdapter(rngs, shape, axes, self.runtime.lora.rank, pdt))
        if cfg.n_shared_experts > 0:
            self.shared = MLP(D, cfg.shared_intermediate_size, std=std, dtype=cfg.compute_dtype,
                              param_dtype=pdt, rngs=rngs, fp8=self.runtime.fp8_gemms,
                              fp8_weights=self.runtime.fp8_resident,
                              lora=self.runtime.lora.on("shared_experts") if self.runtime.lora else None)

    def expert_weights(self):
        """(w_gate, w_up, w_down) as the expert strategy takes them: compute-dtype arrays, the float32 masters
        (FP8 training GEMMs), or `QWeight`s (FP8-resident)."""
        names = ("w_gate", "w_up", "w_down")
        if self.adapted:  # W_e + (alpha / r) A_e B_e, an FP8-resident base dequantised ([E, N, K] -> [E, K, N])
            def base(n):
                if self.runtime.fp8_resident is None:
                    return getattr(self, n)[...].astype(jnp.float32)
                q = QWeight(getattr(self, n)[...], getattr(self, n + SCALE_SUFFIX)[...])
                return q.dequantize().swapaxes(-1, -2)

            dt = jnp.float32 if self.runtime.fp8 else self.cfg.compute_dtype
            return tuple((base(n) + getattr(self, n + EXPERT_SUFFIX).update(self.runtime.lora.scale)).astype(dt)
                         for n in names)
        if self.runtime.fp8_resident is not None:
            return tuple(QWeight(getattr(self, n)[...], getattr(self, n + SCALE_SUFFIX)[...]) for n in names)
        if self.runtime.fp8:
            return tuple(getattr(self, n)[...] for n in names)
        return tuple(getattr(self, n)[...].astype(self.cfg.compute_dtype) for n in names)

    def scores(self, x: jax.Array) -> jax.Array:
        """Sigmoid router scores in float32: [..., D] -> [..., E]."""
        logits = jnp.einsum("...D,DE->...E", x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        return jax.nn.sigmoid(logits)

    def __call__(self, x: jax.Array):
        cfg, rt = self.cfg, self.runtime
        B, T, D = x.shape
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        with jax.named_scope("routing"):
            scores = self.scores(x)  # [B, T, E]
            w, idx = route(scores.reshape(B * T, E), self.bias[...], cfg)
        dt = cfg.compute_dtype
        weights = self.expert_weights()
        xf = x.reshape(B * T, D).astype(dt)
        if sharding.in_manual_region() and not rt.expert_parallel:
            # inside a scheduled pipeline's stage XLA's partitioner aborts on the block layout's row gathers
            # from a sharded operand: the local experts get the stage's rows whole
            xf, idx, w = (sharding.constrain(a, (None,) * a.ndim) for a in (xf, idx, w))
        with jax.named_scope("routed_experts"):
            y, dropped = strategies.experts(rt)(xf, idx, w, *weights)
        y = y.astype(x.dtype).reshape(B, T, D)
        if cfg.n_shared_experts > 0:
            with jax.named_scope("shared_experts"):
                y = y + self.shared(x)
        counts = jnp.bincount(idx.reshape(-1), length=E).astype(jnp.float32)
        bal = balance_loss(scores, idx.reshape(B, T, K), E)
        return y, LayerStats(counts=jax.lax.stop_gradient(counts), balance=bal, dropped=jax.lax.stop_gradient(dropped))


def balance_loss(scores: jax.Array, idx: jax.Array, num_experts: int) -> jax.Array:
    """Sequence-wise balance loss: scores [B, T, E], idx [B, T, K] -> scalar (mean over sequences)."""
    B, T, K = idx.shape
    chosen = jax.nn.one_hot(idx, num_experts, dtype=jnp.float32).sum(axis=(1, 2))  # [B, E]
    f = jax.lax.stop_gradient(chosen * num_experts / (K * T))
    p = (scores / scores.sum(-1, keepdims=True)).mean(axis=1)  # [B, E]
    return (f * p).sum(-1).mean()
