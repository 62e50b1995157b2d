"""DeepSeekMoE: sigmoid router with group-limited top-k and a selection-only bias, dropless routed
experts, shared experts, per-expert loads and the sequence-wise balance loss (REFERENCE.md section 3).

Shape legend: B batch, T tokens per sequence, N = B*T tokens, D model, E routed experts, K top-k,
G groups, F expert ffn width, M = N*K token-expert rows, nb blocks of `b` rows.

Routing, per token (float32 throughout):
    s   = sigmoid(x @ Wg)                       scores [E]
    sc  = s + bias                              bias (RouterBias) is used for SELECTION ONLY
    group score = sum of the top-2 sc in each of G groups; keep the top `topk_group` groups
    idx = top-K of sc over the kept groups
    w   = s[idx] / sum(s[idx])  (norm_topk_prob)  * routed_scaling_factor
    y   = sum_k w_k * SwiGLU_{idx_k}(x) + shared(x)

The bias is a `RouterBias` variable, not a `Param`: the optimizer never sees it; the train step
moves it by gamma * sign(mean load - load) from the returned per-expert counts.

Three interchangeable layouts compute the routed experts (all dropless, all tested against each other):
  * 'dense'  - every expert on every token, combined with a one-hot weight matrix. The reference.
  * 'ragged' - rows sorted by expert, `jax.lax.ragged_dot` grouped GEMMs. For GPU/TPU.
  * 'blocks' - rows sorted by expert into per-expert padded blocks of `b` rows (at most
               M + E*(b-1) rows in all, so no token is ever dropped), each block multiplied by its
               expert's weights with one batched einsum. XLA:CPU lowers ragged_dot densely (~25x
               slower, REFERENCE.md section 9), so 'auto' picks 'blocks' on CPU, 'ragged' elsewhere.

Sequence-wise balance loss (per sequence, then averaged over the batch):
    f_i = E / (K T) * #tokens choosing i,   P_i = mean_t s_i / sum_j s_j,   L_bal = sum_i f_i P_i
It is returned unweighted; the trainer multiplies it by alpha.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import MLP, normal, param
from dsv3_jax.sharding import axis_size, current_mesh


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


def _swiglu(x, w_gate, w_up, w_down, eq_in, eq_out):
    h = jax.nn.silu(jnp.einsum(eq_in, x, w_gate)) * jnp.einsum(eq_in, x, w_up)
    return jnp.einsum(eq_out, h, w_down)


def experts_dense(x, idx, w, w_gate, w_up, w_down):
    """Reference: all E experts on all N tokens. x [N, D] -> [N, D] (f32)."""
    E = w_gate.shape[0]
    y = _swiglu(x, w_gate, w_up, w_down, "ND,EDF->NEF", "NEF,EFD->NED")  # [N, E, D]
    combine = jnp.einsum("NK,NKE->NE", w, jax.nn.one_hot(idx, E, dtype=w.dtype))
    return jnp.einsum("NE,NED->ND", combine, y.astype(jnp.float32))


def experts_ragged(x, idx, w, w_gate, w_up, w_down):
    """Rows sorted by expert, grouped GEMMs with jax.lax.ragged_dot. x [N, D] -> [N, D] (f32)."""
    N, K = idx.shape
    E = w_gate.shape[0]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    rows = x[order // K]  # [M, D] sorted by expert
    h = jax.nn.silu(jax.lax.ragged_dot(rows, w_gate, sizes)) * jax.lax.ragged_dot(rows, w_up, sizes)
    y_sorted = jax.lax.ragged_dot(h, w_down, sizes)  # [M, D]
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(N, K, -1)
    return jnp.einsum("NK,NKD->ND", w, y.astype(jnp.float32))


def block_layout(idx: jax.Array, num_experts: int, block: int):
    """Destination row of each (token, k) in the per-expert padded buffer, and each block's expert.

    Returns dest [N*K] int32 (row in a buffer of nb*block rows) and block_expert [nb] int32, where
    nb = ceil((N*K + E*(block-1)) / block) is a static bound that no routing can exceed.
    """
    flat = idx.reshape(-1)
    M, E = flat.shape[0], num_experts
    sizes = jnp.bincount(flat, length=E)
    padded = (sizes + block - 1) // block * block
    starts = jnp.cumsum(sizes) - sizes
    pad_ends = jnp.cumsum(padded)
    pad_starts = pad_ends - padded
    order = jnp.argsort(flat, stable=True)
    rank_sorted = jnp.arange(M) - starts[flat[order]]  # position of each sorted row inside its expert
    rank = jnp.zeros(M, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    dest = (pad_starts[flat] + rank).astype(jnp.int32)
    nb = -(-(M + E * (block - 1)) // block)
    block_expert = jnp.searchsorted(pad_ends, jnp.arange(nb) * block, side="right")
    return dest, jnp.minimum(block_expert, E - 1).astype(jnp.int32), nb


@jax.custom_vjp
def permute_rows(x: jax.Array, src: jax.Array, inv: jax.Array) -> jax.Array:
    """out[j] = x[src[j]] for an injective row map, with src == len(x) meaning "a zero row".

    `inv` is the inverse map (inv[i] = j with src[j] = i, or len(out) if row i is not used). The
    backward pass is then another gather, grad_x = grad_out[inv], instead of the scatter-add that
    XLA would emit for the transpose of a gather (a serial loop on XLA:CPU).
    """
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[src]


def _permute_fwd(x, src, inv):
    return permute_rows(x, src, inv), (src, inv)


def _permute_bwd(res, g):
    src, inv = res
    return permute_rows(g, inv, src), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def experts_blocks(x, idx, w, w_gate, w_up, w_down, block: int, fp8: bool = False):
    """Rows sorted into per-expert padded blocks, one batched einsum per matrix. x [N, D] -> [N, D] (f32).

    Row moves use `permute_rows` (gathers both ways) and each block's expert weights are selected with
    a one-hot matmul ([nb, E] x [E, D, F]), whose transpose is a GEMM rather than a scatter-add.
    """
    N, K = idx.shape
    D, E = x.shape[1], w_gate.shape[0]
    M = N * K
    dest, block_expert, nb = block_layout(idx, E, block)
    P = nb * block
    src = jnp.full((P,), M, jnp.int32).at[dest].set(jnp.arange(M, dtype=jnp.int32))  # slot -> row (M: empty)
    xb = permute_rows(jnp.repeat(x, K, axis=0), src, dest).reshape(nb, block, D)
    if fp8:  # grouped block-scaled FP8 GEMMs over the same block layout (weights: float32 masters)
        from dsv3_jax.fp8.linear import fp8_expert_blocks

        h = jax.nn.silu(fp8_expert_blocks(xb, w_gate, block_expert)) * fp8_expert_blocks(xb, w_up, block_expert)
        y = fp8_expert_blocks(h, w_down, block_expert).reshape(P, D)
    else:
        pick = jax.nn.one_hot(block_expert, E, dtype=w_gate.dtype)  # [nb, E]
        hi = jax.lax.Precision.HIGHEST  # a selection must not round the weights (e.g. TF32 on GPU)
        wg, wu, wd = (jnp.einsum("nE,E...->n...", pick, wt, precision=hi) for wt in (w_gate, w_up, w_down))
        y = _swiglu(xb, wg, wu, wd, "nbD,nDF->nbF", "nbF,nFD->nbD").reshape(P, D)
    y = permute_rows(y, dest, src).reshape(N, K, D)
    return jnp.einsum("NK,NKD->ND", w, y.astype(jnp.float32))


def resolve_impl(impl: str) -> str:
    if impl == "auto":
        return "blocks" if jax.default_backend() == "cpu" else "ragged"
    return impl


class MoE(nnx.Module):
    """Router + routed experts + shared experts. x [B, T, D] -> (y [B, T, D], counts [E], balance loss,
    dropped token-expert rows (non-zero only on the capacity-limited expert-parallel path))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        std, pdt = cfg.initializer_range, cfg.weight_dtype
        self.router = param(rngs, normal(std), (D, E), ("embed", "router_experts"), pdt)
        self.bias = RouterBias(jnp.zeros((E,), jnp.float32), out_sharding=("router_experts",), eager_sharding=False)
        self.w_gate = param(rngs, normal(std), (E, D, F), ("experts", "embed", "expert_mlp"), pdt)
        self.w_up = param(rngs, normal(std), (E, D, F), ("experts", "embed", "expert_mlp"), pdt)
        self.w_down = param(rngs, normal(std), (E, F, D), ("experts", "expert_mlp", "embed"), pdt)
        if cfg.n_shared_experts > 0:
            self.shared = MLP(D, cfg.shared_intermediate_size, std=std, dtype=cfg.compute_dtype,
                              param_dtype=pdt, rngs=rngs, fp8=cfg.fp8)

    def scores(self, x: jax.Array) -> jax.Array:
        """Sigmoid router scores in float32: [..., D] -> [..., E]."""
        logits = jnp.einsum("...D,DE->...E", x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        return jax.nn.sigmoid(logits)

    def __call__(self, x: jax.Array, impl: str | None = None):
        cfg = self.cfg
        B, T, D = x.shape
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        scores = self.scores(x)  # [B, T, E]
        w, idx = route(scores.reshape(B * T, E), self.bias[...], cfg)
        dt = cfg.compute_dtype
        weights = [p[...] if cfg.fp8 else p[...].astype(dt) for p in (self.w_gate, self.w_up, self.w_down)]
        xf = x.reshape(B * T, D).astype(dt)
        impl = resolve_impl(impl or cfg.moe_impl)
        if cfg.fp8 and impl == "ragged":  # the FP8 grouped GEMM uses the block layout
            impl = "blocks"
        dropped = jnp.zeros((), jnp.float32)  # the single-device layouts are dropless
        if axis_size("expert") > 1:  # expert parallelism over the current mesh
            from dsv3_jax.parallel.expert import experts_expert_parallel

            y, dropped = experts_expert_parallel(xf, idx, w, *weights, mesh=current_mesh(),
                                                 block=cfg.moe_block_size,
                                                 capacity_factor=cfg.expert_capacity_factor, fp8=cfg.fp8,
                                                 dispatch=cfg.expert_dispatch)
        elif impl == "dense":
            y = experts_dense(xf, idx, w, *weights)
        elif impl == "ragged":
            y = experts_ragged(xf, idx, w, *weights)
        elif impl == "blocks":
            y = experts_blocks(xf, idx, w, *weights, block=cfg.moe_block_size, fp8=cfg.fp8)
        else:
            raise UserError(f"unknown MoE implementation {impl!r}")
        y = y.astype(x.dtype).reshape(B, T, D)
        if cfg.n_shared_experts > 0:
            y = y + self.shared(x)
        counts = jnp.bincount(idx.reshape(-1), length=E).astype(jnp.float32)
        bal = balance_loss(scores, idx.reshape(B, T, K), E)
        return y, jax.lax.stop_gradient(counts), bal, jax.lax.stop_gradient(dropped)


def balance_loss(scores: jax.Array, idx: jax.Array, num_experts: int) -> jax.Array:
    """Sequence-wise balance loss: scores [B, T, E], idx [B, T, K] -> scalar (mean over sequences)."""
    B, T, K = idx.shape
    chosen = jax.nn.one_hot(idx, num_experts, dtype=jnp.float32).sum(axis=(1, 2))  # [B, E]
    f = jax.lax.stop_gradient(chosen * num_experts / (K * T))
    p = (scores / scores.sum(-1, keepdims=True)).mean(axis=1)  # [B, E]
    return (f * p).sum(-1).mean()
