"""Routed-expert math on one device: the row layouts and the three interchangeable GEMM formulations.

Shape legend: N tokens, D model, E experts, K top-k, F expert ffn width, M = N*K token-expert rows,
nb blocks of `b` rows, P = nb*b padded rows.

Input: tokens x [N, D] with their routing (expert ids idx [N, K] int32, combine weights w [N, K] f32)
and the expert weights w_gate / w_up [E, D, F], w_down [E, F, D]. Output y [N, D] float32:
    y[n] = sum_k w[n, k] * SwiGLU_{idx[n, k]}(x[n]),   SwiGLU_e(x) = (silu(x Wg_e) * (x Wu_e)) Wd_e
All are dropless and tested against each other (tests/test_moe.py):
  * 'dense'  - every expert on every token, combined with a one-hot weight matrix. The reference. With fewer
               token-expert rows than experts (decoding a small batch) the chosen experts' weights are gathered
               per row instead (`experts_gathered`).
  * 'ragged' - rows sorted by expert, `jax.lax.ragged_dot` grouped GEMMs. For GPU/TPU.
  * 'mgpu'   - the same rows through the Mosaic GPU grouped GEMM (Hopper; `grouped_gemm_mgpu.py`).
  * 'blocks' - rows sorted by expert into per-expert padded blocks of `b` rows (at most
               M + E*(b-1) rows in all, so no token is ever dropped), each block multiplied by its
               expert's weights with one batched einsum, or with the FP8 grouped GEMM
               (`dsv3_jax.fp8.fp8_expert_blocks`). XLA:CPU lowers ragged_dot densely (~25x slower,
               REFERENCE.md section 9), so the resolver picks 'blocks' on CPU, where the float GEMMs run
               as a loop over the blocks that hold rows (`swiglu_block_loop`: XLA:CPU runs a block's flat
               dots at about twice the speed of the same dots batched, and the loop skips the empty blocks
               of the static bound); the batched einsum beside it is the reference.
`block_layout` and `permute_rows` are also the row bookkeeping of expert parallelism
(`parallel/expert.py`), which runs `experts_blocks` on the rows each rank receives.

This module knows nothing of the model: no config, no module, no mesh.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv3_jax.cli import UserError
from dsv3_jax.fp8 import resident
from dsv3_jax.fp8.linear import fp8_expert_blocks
from dsv3_jax.runtime import Fp8Options, Fp8Weights


def _swiglu(x, w_gate, w_up, w_down, eq_in, eq_out):
    h = jax.nn.silu(jnp.einsum(eq_in, x, w_gate)) * jnp.einsum(eq_in, x, w_up)
    return jnp.einsum(eq_out, h, w_down)


def _num_experts(w) -> int:
    return (w.q if isinstance(w, resident.QWeight) else w).shape[0]


def experts_dense(x, idx, w, w_gate, w_up, w_down, fp8_weights: Fp8Weights | None = None):
    """Reference: all E experts on all N tokens. x [N, D] -> [N, D] (f32). FP8-resident weights
    (`resident.QWeight`s [E, N, K]) run as a grouped FP8 GEMM with one group of all N rows per expert."""
    E = _num_experts(w_gate)
    with jax.named_scope("expert_gemms"):
        # the tokens broadcast to every expert, [E, N, D]: a GEMM batched over E reads the weights in their
        # stored [E, D, F] layout ("ND,EDF->NEF" had XLA:CPU copy w_gate and w_up to [D, E F] first, every call)
        xe = jnp.broadcast_to(x, (E,) + x.shape)
        if isinstance(w_gate, resident.QWeight):
            experts = jnp.arange(E, dtype=jnp.int32)  # block e is expert e

            def gemm(a, wt):
                return resident.expert_blocks(a, wt, experts, fp8_weights)

            y = gemm(jax.nn.silu(gemm(xe, w_gate)) * gemm(xe, w_up), w_down)  # [E, N, D]
        else:
            y = _swiglu(xe, w_gate, w_up, w_down, "END,EDF->ENF", "ENF,EFD->END")
    with jax.named_scope("combine"):
        combine = jnp.einsum("NK,NKE->NE", w, jax.nn.one_hot(idx, E, dtype=w.dtype))
        return jnp.sum(combine.T[:, :, None] * y.astype(jnp.float32), axis=0)


def experts_gathered(x, idx, w, w_gate, w_up, w_down):
    """Each token through its K chosen experts only, their weights gathered per row ([N, K, D, F]): the layout for a
    few tokens (decoding a small batch), where `experts_dense` would multiply every one of the E experts.
    x [N, D] -> [N, D] (f32); exact, like the others."""
    with jax.named_scope("expert_gemms"):
        h = jax.nn.silu(jnp.einsum("ND,NKDF->NKF", x, w_gate[idx])) * jnp.einsum("ND,NKDF->NKF", x, w_up[idx])
        y = jnp.einsum("NKF,NKFD->NKD", h, w_down[idx])
    with jax.named_scope("combine"):
        return jnp.einsum("NK,NKD->ND", w, y.astype(jnp.float32))


def experts_ragged(x, idx, w, w_gate, w_up, w_down, gemm=jax.lax.ragged_dot):
    """Rows sorted by expert, grouped GEMMs (`gemm(rows, w, sizes)`: jax.lax.ragged_dot, or the Mosaic GPU
    kernel). x [N, D] -> [N, D] (f32)."""
    N, K = idx.shape
    E = w_gate.shape[0]
    with jax.named_scope("dispatch"):
        flat = idx.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
        rows = x[order // K]  # [M, D] sorted by expert
    with jax.named_scope("expert_gemms"):
        h = jax.nn.silu(gemm(rows, w_gate, sizes)) * gemm(rows, w_up, sizes)
        y_sorted = gemm(h, w_down, sizes)  # [M, D]
    with jax.named_scope("combine"):
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


def _used_blocks(dest, block: int, nb: int):
    """[nb] bool: the blocks that hold rows. `block_layout` packs the experts' blocks from the start and every
    block it assigns holds at least one row, so the used blocks are those up to the one of the highest row."""
    return jnp.arange(nb) <= jnp.max(dest, initial=-1) // block  # (no rows: none)


@jax.custom_vjp
def swiglu_block_loop(xb, block_expert, used, w_gate, w_up, w_down):
    """Each block's SwiGLU with its expert's weights, one block at a time (`jax.lax.map`), blocks not `used`
    skipped (zeros): xb [nb, b, D], block_expert [nb], used [nb] -> [nb, b, D]. The CPU form of the batched
    einsum in `experts_blocks` (the reference): the same products row by row. Its backward is another loop that
    adds each block's weight gradients into its expert's (the einsum's transpose would be a GEMM against the
    one-hot [nb, E] selection), summed in float32 at least whatever the weights' dtype (bf16 sums of many blocks
    would lose what the einsum's single dot keeps)."""
    return _block_loop(xb, block_expert, used, w_gate, w_up, w_down, keep=False)


def _block_loop(xb, block_expert, used, w_gate, w_up, w_down, keep: bool):
    """The forward loop: y [nb, b, D], and with `keep` the pre-activations x Wg, x Wu [nb, b, F] as well."""
    b, D, F = xb.shape[1], xb.shape[2], w_gate.shape[-1]
    dt = jnp.result_type(xb, w_gate)

    def one(args):
        xi, e, u = args

        def run():
            a, g = xi @ w_gate[e], xi @ w_up[e]
            y = (jax.nn.silu(a) * g) @ w_down[e]
            return (y, a, g) if keep else y

        def skip():
            y = jnp.zeros((b, D), dt)
            return (y, jnp.zeros((b, F), dt), jnp.zeros((b, F), dt)) if keep else y

        return jax.lax.cond(u, run, skip)

    return jax.lax.map(one, (xb, block_expert, used))


def _block_loop_fwd(xb, block_expert, used, w_gate, w_up, w_down):
    y, a, g = _block_loop(xb, block_expert, used, w_gate, w_up, w_down, keep=True)
    return y, (xb, block_expert, used, w_gate, w_up, w_down, a, g)


def _block_loop_bwd(res, dy):
    xb, block_expert, used, w_gate, w_up, w_down, a, g = res

    def one(grads, args):
        xi, e, u, ai, gi, dyi = args

        def run():
            s = jax.nn.sigmoid(ai)
            silu = ai * s
            dh = dyi @ w_down[e].T
            da = dh * gi * (s + silu * (1 - s))  # silu'(a) = s (1 + a (1 - s))
            dg = dh * silu
            dwg, dwu, dwd = grads
            added = (dwg.at[e].add((xi.T @ da).astype(dwg.dtype)), dwu.at[e].add((xi.T @ dg).astype(dwu.dtype)),
                     dwd.at[e].add(((silu * gi).T @ dyi).astype(dwd.dtype)))
            return (da @ w_gate[e].T + dg @ w_up[e].T).astype(xi.dtype), added

        return jax.lax.cond(u, run, lambda: (jnp.zeros_like(xi), grads))[::-1]

    weights = (w_gate, w_up, w_down)
    zeros = tuple(jnp.zeros(t.shape, jnp.promote_types(t.dtype, jnp.float32)) for t in weights)
    grads, dx = jax.lax.scan(one, zeros, (xb, block_expert, used, a, g, dy))
    return (dx, None, None) + tuple(d.astype(t.dtype) for d, t in zip(grads, weights))


swiglu_block_loop.defvjp(_block_loop_fwd, _block_loop_bwd)


def experts_blocks(x, idx, w, w_gate, w_up, w_down, block: int, fp8: Fp8Options | None = None,
                   fp8_weights: Fp8Weights | None = None, loop: bool = False):
    """Rows sorted into per-expert padded blocks, one batched einsum per matrix. x [N, D] -> [N, D] (f32).

    Row moves use `permute_rows` (gathers both ways) and each block's expert weights are selected with
    a one-hot matmul ([nb, E] x [E, D, F]), whose transpose is a GEMM rather than a scatter-add.
    `fp8`: run the three GEMMs as grouped block-scaled FP8 GEMMs with these options (weights: float32
    masters) over the same block layout. FP8-resident weights (`resident.QWeight`s [E, N, K] with their
    block scales) run the same grouped GEMM forward-only, in `fp8_weights.mode`. `loop` (float weights): the
    GEMMs as `swiglu_block_loop` over the blocks that hold rows (the CPU form).
    """
    N, K = idx.shape
    D, E = x.shape[1], _num_experts(w_gate)
    M = N * K
    with jax.named_scope("dispatch"):
        dest, block_expert, nb = block_layout(idx, E, block)
        P = nb * block
        src = jnp.full((P,), M, jnp.int32).at[dest].set(jnp.arange(M, dtype=jnp.int32))  # slot -> row (M: empty)
        xb = permute_rows(jnp.repeat(x, K, axis=0), src, dest).reshape(nb, block, D)
    with jax.named_scope("expert_gemms"):
        if isinstance(w_gate, resident.QWeight):
            def gemm(a, wt):
                return resident.expert_blocks(a, wt, block_expert, fp8_weights)

            h = jax.nn.silu(gemm(xb, w_gate)) * gemm(xb, w_up)
            y = gemm(h, w_down).reshape(P, D)
        elif fp8 is not None:
            def gemm(a, wt):
                return fp8_expert_blocks(a, wt, block_expert, options=fp8)

            h = jax.nn.silu(gemm(xb, w_gate)) * gemm(xb, w_up)
            y = gemm(h, w_down).reshape(P, D)
        elif loop:
            y = swiglu_block_loop(xb, block_expert, _used_blocks(dest, block, nb), w_gate, w_up, w_down)
            y = y.reshape(P, D)
        else:
            pick = jax.nn.one_hot(block_expert, E, dtype=w_gate.dtype)  # [nb, E]
            hi = jax.lax.Precision.HIGHEST  # a selection must not round the weights (e.g. TF32 on GPU)
            wg, wu, wd = (jnp.einsum("nE,E...->n...", pick, wt, precision=hi) for wt in (w_gate, w_up, w_down))
            y = _swiglu(xb, wg, wu, wd, "nbD,nDF->nbF", "nbF,nFD->nbD").reshape(P, D)
    with jax.named_scope("combine"):
        y = permute_rows(y, dest, src).reshape(N, K, D)
        return jnp.einsum("NK,NKD->ND", w, y.astype(jnp.float32))


def fewer_rows_than_experts(tokens: int, top_k: int, num_experts: int) -> bool:
    """N K < E: fewer token-expert rows than experts (decoding a few rows), where 'dense' gathers."""
    return tokens * top_k < num_experts


def gathers(x, idx, w_gate) -> bool:
    """'dense' on fewer token-expert rows than experts (N K < E: decoding a few rows) gathers the chosen experts'
    weights instead (`experts_gathered`: N K expert matrices read, not E); float weights only."""
    return not isinstance(w_gate, resident.QWeight) and fewer_rows_than_experts(*idx.shape, _num_experts(w_gate))


@dataclasses.dataclass(frozen=True)
class LocalExperts:
    """Expert strategy: every routed expert on this device, in layout `impl`. Dropless."""

    impl: str  # 'dense' | 'blocks' | 'ragged' | 'mgpu'
    block: int = 64
    fp8: Fp8Options | None = None
    fp8_weights: Fp8Weights | None = None
    loop: bool = False  # 'blocks' with float weights: the GEMMs as a loop over the used blocks (the CPU form)

    def __call__(self, x, idx, w, w_gate, w_up, w_down):
        """x [N, D], idx/w [N, K], weights -> (y [N, D] float32, dropped rows (always 0))."""
        if self.impl == "dense" and gathers(x, idx, w_gate):
            y = experts_gathered(x, idx, w, w_gate, w_up, w_down)
        elif self.impl == "dense":
            y = experts_dense(x, idx, w, w_gate, w_up, w_down, self.fp8_weights)
        elif self.impl == "ragged":
            y = experts_ragged(x, idx, w, w_gate, w_up, w_down)
        elif self.impl == "mgpu":
            from dsv3_jax.grouped_gemm_mgpu import grouped_gemm_mgpu

            y = experts_ragged(x, idx, w, w_gate, w_up, w_down, grouped_gemm_mgpu())
        elif self.impl == "blocks":
            y = experts_blocks(x, idx, w, w_gate, w_up, w_down, self.block, self.fp8, self.fp8_weights, self.loop)
        else:
            raise UserError(f"unknown expert layout {self.impl!r}")
        return y, jnp.zeros((), jnp.float32)
