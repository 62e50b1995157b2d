"""Block-scaled FP8 GEMM with FP32 promotion every 128 elements of K (REFERENCE.md sections 6 and 8).

Operands (see quant.py for how they are produced):
    A  a_q [P, K] e4m3, a_s [P, Kb] f32           1 x 128 tiles: one scale per row per K block, or
       a   [P, K] bf16/f32, a_s None              weight-only: A unquantised (each fp8 block of B is upcast
                                                  to A's dtype inside the GEMM, exact: e4m3 is a subset of bf16)
    B  b_q [E, N, K] e4m3 stored [N, K] (K-major), with either
         block scales b_s [E, ceil(N/128), Kb]    128 x 128 weight blocks (also HF's weight_scale_inv), or
         row   scales b_s [E, N, Kb]              1 x 128 tiles (when B is itself an activation/gradient)
    out[p, n] = sum_kb  a_s[p, kb] * b_s[e(p), n, kb] * sum_{c < 128} a_q[p, kb, c] * b_q[e(p), n, kb, c]
E = 1 is a plain GEMM (b_q may then be 2-D). With E > 1, `groups` [P / group_rows] names the expert of
each consecutive block of `group_rows` rows: the MoE 'blocks' layout of moe.py, which is DeepGEMM's
"contiguous" grouped layout (each expert's rows padded to a whole number of blocks).

The inner sum runs in a fresh FP32 partial per 128-wide K block; the partial is scaled by the two
blocks' scales and added to an FP32 accumulator (DeepGEMM's promotion; Hopper's FP8 tensor-core
accumulator keeps only ~14 bits, so without this the error grows with K). Three implementations:
  * 'dequant' - the reference: dequantise both operands to f32 and `jnp.dot` them (HIGHEST precision).
  * 'blocked' - plain jnp: one `dot_general` of the fp8 blocks with K blocks as a batch dimension and
                `preferred_element_type=f32`, then the per-block rescale and an f32 sum over blocks.
                This is the CPU training path; it holds a [Kb, P, N] f32 intermediate.
  * 'pallas'  - the kernel. GPU: Triton backend (`jax.experimental.pallas.triton`), one program per
                [bm, bn] output tile with an in-kernel loop over K blocks; FP8 MMA on sm_89+ (Hopper's
                wgmma wants B K-major, hence [N, K] storage). TPU: Mosaic, grid (M, N, K blocks) with a VMEM
                f32 accumulator; fp8 is fed to the MXU on TPU v7, elsewhere each fp8 block is upcast to
                bf16 in VMEM (exact: e4m3 is a subset of bf16). On CPU it runs with interpret=True.
All three agree to f32 rounding (tests/test_fp8.py); they differ in speed and memory only.

`gemm_segmented` is the transposed problem for expert weight gradients: K runs over token rows, split
into 128-row tiles (`tile_groups` [T], non-decreasing) and each group sums only its own tiles:
    out[g] = sum_{t : tile_groups[t] == g} a_s[:, t] b_s[:, t]^T * (a_q[:, t] @ b_q[:, t]^T)   -> [G, M, N]

Shapes that are not multiples of the tile sizes are zero-padded here and the result cropped.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsv3_jax import runtime
from dsv3_jax.cli import UserError
from dsv3_jax.fp8.quant import FP8, TILE, ceil_div, pad_axis

_HI = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------- operand prep
def _prep(a_q, a_s, b_q, b_s):
    """Validate, pad K to whole blocks, turn B's scales into per-row scales [E, N, Kb]. A weight-only
    call (a_s None, A in bf16/f32) gets a_s = None back."""
    weight_only = a_s is None
    if (a_q.dtype != FP8 and not weight_only) or b_q.dtype != FP8:
        raise TypeError(f"fp8 gemm wants float8_e4m3fn operands (or a_s=None for an unquantised A), got "
                        f"{a_q.dtype} and {b_q.dtype}.")
    if weight_only and a_q.dtype == FP8:
        raise TypeError("fp8 gemm: an fp8 A needs its scales a_s.")
    if b_q.ndim == 2:
        b_q, b_s = b_q[None], b_s[None]
    P, K = a_q.shape
    E, N, Kbq = b_q.shape
    Kb = ceil_div(max(K, Kbq), TILE)
    if weight_only:
        a_s = jnp.ones((P, Kb), jnp.float32)
    if ceil_div(K, TILE) != ceil_div(Kbq, TILE) or a_s.shape != (P, Kb) or b_s.shape[-1] != Kb:
        raise UserError(f"fp8 gemm: A {a_q.shape} / scales {a_s.shape} and B {b_q.shape} / scales {b_s.shape} "
                        f"disagree on K (expected {Kb} K blocks of {TILE}).")
    if b_s.shape[1] == N:
        b_rs = b_s
    elif b_s.shape[1] == ceil_div(N, TILE):
        b_rs = jnp.repeat(b_s, TILE, axis=1)[:, :N]
    else:
        raise UserError(f"fp8 gemm: B scales {b_s.shape} are neither per row ({N}) nor per 128-row block "
                        f"({ceil_div(N, TILE)}) of B {b_q.shape}.")
    a_s = None if weight_only else a_s.astype(jnp.float32)
    return pad_axis(a_q, 1, TILE), a_s, pad_axis(b_q, 2, TILE), b_rs.astype(jnp.float32)


def _check_groups(P, E, groups, group_rows):
    if groups is None:
        if E != 1:
            raise UserError(f"fp8 gemm: B holds {E} matrices; pass `groups` (the matrix of each row block).")
        return None
    if group_rows is None or P % group_rows:
        raise UserError(f"fp8 gemm: {P} rows are not whole blocks of group_rows={group_rows}.")
    if groups.shape != (P // group_rows,):
        raise UserError(f"fp8 gemm: groups has shape {groups.shape}, expected ({P // group_rows},).")
    return groups.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- jnp paths
def _gemm_dequant(a_q, a_s, b_q, b_rs, groups, group_rows, out_dtype):
    if a_s is None:
        a = a_q.astype(jnp.float32)
    else:
        a = (a_q.reshape(a_s.shape + (TILE,)).astype(jnp.float32) * a_s[..., None]).reshape(a_q.shape)
    b = (b_q.reshape(b_rs.shape + (TILE,)).astype(jnp.float32) * b_rs[..., None]).reshape(b_q.shape)
    if groups is None:
        return jnp.dot(a, b[0].T, precision=_HI).astype(out_dtype)
    ab = a.reshape(-1, group_rows, a.shape[-1])
    return jnp.einsum("nrk,nck->nrc", ab, b[groups], precision=_HI).reshape(a.shape[0], -1).astype(out_dtype)


def _gemm_blocked(a_q, a_s, b_q, b_rs, groups, group_rows, out_dtype):
    P, Kp = a_q.shape
    E, N, _ = b_q.shape
    Kb = Kp // TILE
    f32 = jnp.float32
    if a_s is None:  # weight-only: B's fp8 blocks upcast to A's dtype (exact), A as it is
        b_q = b_q.astype(a_q.dtype)
    if groups is None:
        part = jax.lax.dot_general(a_q.reshape(P, Kb, TILE), b_q[0].reshape(N, Kb, TILE),
                                   (((2,), (2,)), ((1,), (1,))), preferred_element_type=f32)  # [Kb, P, N]
        part = part * b_rs[0].T[:, None, :]
        out = (part if a_s is None else part * a_s.T[:, :, None]).sum(0)
        return out.astype(out_dtype)
    nb = P // group_rows
    a = a_q.reshape(nb, group_rows, Kb, TILE)
    b = b_q[groups].reshape(nb, N, Kb, TILE)
    part = jax.lax.dot_general(a, b, (((3,), (3,)), ((0, 2), (0, 2))), preferred_element_type=f32)  # [nb, Kb, r, N]
    part = part * b_rs[groups].transpose(0, 2, 1)[:, :, None, :]  # x [nb, Kb, 1, N]
    if a_s is not None:
        part = part * a_s.reshape(nb, group_rows, Kb).transpose(0, 2, 1)[..., None]  # x [nb, Kb, r, 1]
    return part.sum(1).reshape(P, N).astype(out_dtype)


# ---------------------------------------------------------------------------------------------- Pallas kernels
# Scale layouts inside the kernels: A's scales stay [P, Kb] (rows x K blocks; one [bm, Kb] block per row
# tile), B's are K-major [E, Kb, N] (one [Kb, bn] block per column tile), so the K block k selects a
# column of A's and a row of B's: a [bm, 1] and a [1, bn] factor for the [bm, bn] partial. Neither needs
# a lane-padded [.., 1] array in HBM.
def _partial(a, b, upcast):
    """One 128-wide K block: fp8 x fp8 -> fresh f32 partial [bm, bn] (B is [bn, bk], K-major). A weight-only
    call has A in bf16/f32: B's fp8 block is upcast to it (exact)."""
    if a.dtype != b.dtype:
        b = b.astype(a.dtype)
    elif upcast:
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    # fp8 and bf16 products are exact in the f32 accumulator at the MXU's native precision; a process-wide
    # 'highest' matmul precision (the tests set one) would ask Mosaic for an fp32 contraction of fp8 operands,
    # which it refuses ("Bad lhs type")
    native = jax.lax.Precision.DEFAULT if a.dtype in (FP8, jnp.bfloat16) else None
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=native)


def _pick(x, k, axis):
    """x[:, k:k+1] (axis=1) or x[k:k+1, :] (axis=0) for a traced k, by masking and summing: Mosaic-safe
    (no dynamic lane/sublane slicing) and cheap next to the 128-deep matmul it scales."""
    hit = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) == k
    return jnp.sum(jnp.where(hit, x, 0.0), axis=axis, keepdims=True)


def _grouped_kernel_triton(g_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, nk, bk):
    # grid (i, j); a_ref [bm, Kp]; as_ref [bm, Kb]; b_ref [E, bn, Kp]; bs_ref [E, Kb, bn]; o_ref [bm, bn]
    e = g_ref[pl.program_id(0)]

    def body(k, acc):
        part = _partial(a_ref[:, pl.ds(k * bk, bk)], b_ref[e, :, pl.ds(k * bk, bk)], False)
        return acc + part * as_ref[:, pl.ds(k, 1)] * bs_ref[e, pl.ds(k, 1), :]  # promotion: scale, add in f32

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _grouped_kernel_tpu(g_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, acc_ref, *, upcast):
    # grid (i, j, k); a_ref [bm, bk]; as_ref [bm, Kb]; b_ref [bn, bk]; bs_ref [Kb, bn]; acc_ref VMEM f32
    del g_ref  # consumed by the index maps
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    scale = _pick(as_ref[...], k, 1) * _pick(bs_ref[...], k, 0)  # [bm, 1] * [1, bn]
    acc_ref[...] += _partial(a_ref[...], b_ref[...], upcast) * scale

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _call_grouped(a_q, a_s, b_q, bs_k, groups, *, bm, bn, out_dtype, backend, interpret, num_warps,
                  num_stages, tpu_fp8):
    """a_q [P, Kp], a_s [P, Kb], b_q [E, Np, Kp], bs_k [E, Kb, Np], groups [P/bm] -> [P, Np]."""
    P, Kp = a_q.shape
    E, Np, _ = b_q.shape
    Kb = Kp // TILE
    out_shape = jax.ShapeDtypeStruct((P, Np), out_dtype)
    if backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        return pl.pallas_call(
            functools.partial(_grouped_kernel_triton, nk=Kb, bk=TILE),
            out_shape=out_shape,
            grid=(P // bm, Np // bn),
            in_specs=[pl.BlockSpec((P // bm,), lambda i, j: (0,)),
                      pl.BlockSpec((bm, Kp), lambda i, j: (i, 0)),
                      pl.BlockSpec((bm, Kb), lambda i, j: (i, 0)),
                      pl.BlockSpec((E, bn, Kp), lambda i, j: (0, j, 0)),
                      pl.BlockSpec((E, Kb, bn), lambda i, j: (0, 0, j))],
            out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret, name="fp8_blockscaled_gemm",
        )(groups, a_q, a_s, b_q, bs_k)
    from jax.experimental.pallas import tpu as pltpu

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(P // bm, Np // bn, Kb),
        in_specs=[pl.BlockSpec((bm, TILE), lambda i, j, k, g: (i, k)),
                  pl.BlockSpec((bm, Kb), lambda i, j, k, g: (i, 0)),
                  pl.BlockSpec((None, bn, TILE), lambda i, j, k, g: (g[i], j, k)),
                  pl.BlockSpec((None, Kb, bn), lambda i, j, k, g: (g[i], 0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k, g: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_grouped_kernel_tpu, upcast=not tpu_fp8),
        out_shape=out_shape, grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="fp8_blockscaled_gemm",
    )(groups, a_q, a_s, b_q, bs_k)


# ---------------------------------------------------------------------------------------------- partitioning
# A Pallas kernel is opaque to XLA's SPMD partitioner ("Mosaic kernels cannot be automatically partitioned"): called
# on arrays split over a mesh, outside `shard_map`, the program does not compile. Under a mesh context
# (`jax.set_mesh`: the train step, the engine's steps on a mesh, the AOT compiles) the GEMM is therefore run in its
# own `shard_map`: each device multiplies its rows of A (split over the batch axes, where each device then gets
# whole row blocks) by its columns of B (split over 'tensor', where each device gets whole column blocks), with K
# and the experts of B whole on every device; XLA moves the operands there first (a K split is gathered). Inside
# `shard_map` already (the expert-parallel path), or without a mesh, the kernel is called as it is.
# (`jax.custom_partitioning` would leave the choice to the partitioner, but libtpu's compile-only client used for
# ahead-of-time TPU compiles has no partitioner for it: "Custom emitter for CustomSPMDPartitioning not found".)
def _split(mesh, names, size: int, block: int):
    """The longest prefix of mesh axes `names` (those of size > 1) over which `size` splits into whole blocks."""
    axes = [a for a in names if a in mesh.axis_names and mesh.shape[a] > 1]
    while axes and size % (math.prod(mesh.shape[a] for a in axes) * block):
        axes.pop()
    return tuple(axes) or None


def _grouped(a_q, a_s, b_q, bs_k, groups, **kw):
    """`_call_grouped`, in its own shard_map under a mesh context (see above)."""
    from jax.sharding import PartitionSpec as P

    from dsv3_jax.sharding import BATCH_AXES

    mesh = jax.sharding.get_abstract_mesh()
    local = lambda groups, a_q, a_s, b_q, bs_k: _call_grouped(a_q, a_s, b_q, bs_k, groups, **kw)  # noqa: E731
    if mesh.empty or mesh.manual_axes or mesh.size == 1:
        return local(groups, a_q, a_s, b_q, bs_k)
    rows = _split(mesh, BATCH_AXES, a_q.shape[0], kw["bm"])
    cols = _split(mesh, ("tensor",), b_q.shape[1], kw["bn"])
    specs = (P(rows), P(rows, None), P(rows, None), P(None, cols, None), P(None, None, cols))
    return jax.shard_map(local, in_specs=specs, out_specs=P(rows, cols), check_vma=False)(groups, a_q, a_s, b_q,
                                                                                           bs_k)


def _segmented_kernel_triton(start_ref, count_ref, a_ref, as_ref, b_ref, bs_ref, o_ref, *, bk):
    # grid (g, i, j); a_ref [bm, T*bk]; as_ref [bm, T]; b_ref [bn, T*bk]; bs_ref [T, bn]; o_ref [bm, bn]
    g = pl.program_id(0)
    start = start_ref[g]

    def body(t, acc):
        k = start + t
        part = _partial(a_ref[:, pl.ds(k * bk, bk)], b_ref[:, pl.ds(k * bk, bk)], False)
        return acc + part * as_ref[:, pl.ds(k, 1)] * bs_ref[pl.ds(k, 1), :]

    acc = jax.lax.fori_loop(0, count_ref[g], body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _segmented_kernel_tpu(tg_ref, a_ref, as_ref, b_ref, bs_ref, zeros_ref, o_ref, acc_ref, *, upcast):
    # grid (i, j, t); the output block (tg[t], i, j) stays resident while t walks one group's tiles.
    del zeros_ref  # aliased to the output: groups without tiles keep these zeros
    t, T = pl.program_id(2), pl.num_programs(2)
    g = tg_ref[t]
    first = jnp.logical_or(t == 0, tg_ref[jnp.maximum(t - 1, 0)] != g)
    last = jnp.logical_or(t == T - 1, tg_ref[jnp.minimum(t + 1, T - 1)] != g)

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    scale = _pick(as_ref[...], t, 1) * _pick(bs_ref[...], t, 0)
    acc_ref[...] += _partial(a_ref[...], b_ref[...], upcast) * scale

    @pl.when(last)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _call_segmented(a_q, a_s, b_q, bs_k, tile_groups, num_groups, *, bm, bn, bk, out_dtype, backend,
                    interpret, num_warps, num_stages, tpu_fp8):
    """a_q [Mp, T*bk], a_s [Mp, T], b_q [Np, T*bk], bs_k [T, Np], tile_groups [T] -> [G, Mp, Np]."""
    Mp, Kp = a_q.shape
    Np = b_q.shape[0]
    T = Kp // bk
    G = num_groups
    out_shape = jax.ShapeDtypeStruct((G, Mp, Np), out_dtype)
    if backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        count = jnp.bincount(tile_groups, length=G).astype(jnp.int32)
        start = (jnp.cumsum(count) - count).astype(jnp.int32)
        scalar = pl.BlockSpec((G,), lambda g, i, j: (0,))
        return pl.pallas_call(
            functools.partial(_segmented_kernel_triton, bk=bk),
            out_shape=out_shape,
            grid=(G, Mp // bm, Np // bn),
            in_specs=[scalar, scalar,
                      pl.BlockSpec((bm, Kp), lambda g, i, j: (i, 0)),
                      pl.BlockSpec((bm, T), lambda g, i, j: (i, 0)),
                      pl.BlockSpec((bn, Kp), lambda g, i, j: (j, 0)),
                      pl.BlockSpec((T, bn), lambda g, i, j: (0, j))],
            out_specs=pl.BlockSpec((None, bm, bn), lambda g, i, j: (g, i, j)),
            compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret, name="fp8_blockscaled_gemm_segmented",
        )(start, count, a_q, a_s, b_q, bs_k)
    from jax.experimental.pallas import tpu as pltpu

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(Mp // bm, Np // bn, T),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, t, tg: (i, t)),
                  pl.BlockSpec((bm, T), lambda i, j, t, tg: (i, 0)),
                  pl.BlockSpec((bn, bk), lambda i, j, t, tg: (j, t)),
                  pl.BlockSpec((T, bn), lambda i, j, t, tg: (0, j)),
                  pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, t, tg: (tg[t], i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_segmented_kernel_tpu, upcast=not tpu_fp8),
        out_shape=out_shape, grid_spec=grid_spec, input_output_aliases={5: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="fp8_blockscaled_gemm_segmented",
    )(tile_groups, a_q, a_s, b_q, bs_k, jnp.zeros(out_shape.shape, out_dtype))


def _kernel_opts(backend, interpret, tpu_fp8):
    return runtime.fp8_backend(backend), runtime.fp8_interpret(interpret), runtime.fp8_tpu_mxu(tpu_fp8)


# ---------------------------------------------------------------------------------------------- public API
def gemm(a_q, a_s, b_q, b_s, *, groups=None, group_rows=None, out_dtype=jnp.bfloat16, impl="auto",
         backend="auto", interpret=None, block_m=128, block_n=128, num_warps=8, num_stages=3, tpu_fp8=None):
    """Block-scaled FP8 GEMM: A [P, K] (1x128 tiles) times B^T, B [E, N, K] or [N, K] -> [P, N] out_dtype.
    a_s=None: weight-only, A is bf16/f32 and only B is FP8 (dequantised block by block inside the GEMM).

    groups [P / group_rows] int32: expert of each block of `group_rows` rows (None when B is 2-D / E = 1).
    impl: 'dequant' | 'blocked' | 'pallas' | 'auto' (see the module docstring). Kernel options (pallas only):
    backend 'triton' | 'mosaic_tpu' | 'auto'; interpret (default: on CPU); block_m/block_n output tile
    (block_m is group_rows when grouped); num_warps/num_stages (Triton); tpu_fp8 (feed fp8 to the TPU MXU;
    default: only on TPU v7).
    """
    a_q, a_s, b_q, b_rs = _prep(a_q, a_s, b_q, b_s)
    P, N = a_q.shape[0], b_q.shape[1]
    groups = _check_groups(P, b_q.shape[0], groups, group_rows)
    impl = runtime.fp8_impl(impl)  # 'auto': 'blocked' on CPU, 'pallas' elsewhere
    if impl == "dequant":
        return _gemm_dequant(a_q, a_s, b_q, b_rs, groups, group_rows, out_dtype)
    if impl == "blocked":
        return _gemm_blocked(a_q, a_s, b_q, b_rs, groups, group_rows, out_dtype)
    backend, interpret, tpu_fp8 = _kernel_opts(backend, interpret, tpu_fp8)
    if a_s is None:  # weight-only: the kernel scales A's blocks by 1
        a_s = jnp.ones((a_q.shape[0], a_q.shape[1] // TILE), jnp.float32)
    if groups is None:
        bm = block_m
        a_q, a_s = pad_axis(a_q, 0, bm), pad_axis(a_s, 0, bm)
        groups = jnp.zeros((a_q.shape[0] // bm,), jnp.int32)
    else:
        bm = group_rows
    b_q, b_rs = pad_axis(b_q, 1, block_n), pad_axis(b_rs, 1, block_n)
    out = _grouped(a_q, a_s, b_q, b_rs.transpose(0, 2, 1), groups,
                   bm=bm, bn=block_n, out_dtype=out_dtype, backend=backend, interpret=interpret,
                   num_warps=num_warps, num_stages=num_stages, tpu_fp8=tpu_fp8)
    return out[:P, :N]


def gemm_segmented(a_q, a_s, b_q, b_s, tile_groups, num_groups, *, out_dtype=jnp.float32, impl="auto",
                   backend="auto", interpret=None, block_m=128, block_n=128, num_warps=8, num_stages=3,
                   tpu_fp8=None):
    """Per-group sums over K tiles: a_q [M, T*tk], a_s [M, T], b_q [N, T*tk], b_s [N, T] (1 x tk tiles on
    both), tile_groups [T] non-decreasing in [0, G) -> [G, M, N]. Groups without tiles give zeros.
    Used for the MoE Wgrad, where K is the token-row axis and each expert owns a run of row tiles."""
    if a_q.dtype != FP8 or b_q.dtype != FP8:
        raise TypeError(f"fp8 gemm_segmented wants float8_e4m3fn operands, got {a_q.dtype} and {b_q.dtype}.")
    M, Kp = a_q.shape
    N = b_q.shape[0]
    T = tile_groups.shape[0]
    if Kp % T or b_q.shape[1] != Kp or a_s.shape != (M, T) or b_s.shape != (N, T):
        raise UserError(f"fp8 gemm_segmented: A {a_q.shape}/{a_s.shape}, B {b_q.shape}/{b_s.shape} do not "
                        f"split into {T} K tiles.")
    tk = Kp // T
    tile_groups = tile_groups.astype(jnp.int32)
    a_s, b_s = a_s.astype(jnp.float32), b_s.astype(jnp.float32)
    impl = runtime.fp8_impl(impl)  # 'auto': 'blocked' on CPU, 'pallas' elsewhere
    if impl in ("dequant", "blocked"):
        a, b = a_q.reshape(M, T, tk), b_q.reshape(N, T, tk)
        if impl == "dequant":
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        part = jax.lax.dot_general(a, b, (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.float32,
                                   precision=_HI if impl == "dequant" else None)  # [T, M, N]
        part = part * a_s.T[:, :, None] * b_s.T[:, None, :]
        onehot = jax.nn.one_hot(tile_groups, num_groups, dtype=jnp.float32)  # [T, G]
        return jnp.einsum("tg,tmn->gmn", onehot, part, precision=_HI).astype(out_dtype)
    backend, interpret, tpu_fp8 = _kernel_opts(backend, interpret, tpu_fp8)
    a_q, a_s = pad_axis(a_q, 0, block_m), pad_axis(a_s, 0, block_m)
    b_q, b_s = pad_axis(b_q, 0, block_n), pad_axis(b_s, 0, block_n)
    out = _call_segmented(a_q, a_s, b_q, b_s.T, tile_groups, num_groups,
                          bm=block_m, bn=block_n, bk=tk, out_dtype=out_dtype, backend=backend,
                          interpret=interpret, num_warps=num_warps, num_stages=num_stages, tpu_fp8=tpu_fp8)
    return out[:, :M, :N]


def reference_gemm(a_q, a_s, b_q, b_s, *, groups=None, group_rows=None, out_dtype=jnp.float32):
    """The plain-jnp reference: dequantise both operands, f32 matmul at HIGHEST precision."""
    return gemm(a_q, a_s, b_q, b_s, groups=groups, group_rows=group_rows, out_dtype=out_dtype, impl="dequant")
