"""Absorbed-MLA attention read through the page table: the plain-jnp reference and a Pallas kernel.

Shape legend (paged_cache.py): B rows, T query tokens per row, N heads, R kv_lora_rank, dr qk_rope_head_dim,
P pages in the pool, G page size, M page-table entries per row, L stacked layers.

    o_lat[b, t, n] = sum_s softmax_s(scale * (q_abs[b,t,n] . c_kv[s] + q_pe[b,t,n] . k_pe[s])) c_kv[s]
                     over the slots s <= positions[b, t] of row b, slot s living at page table[b, s // G],
                     offset s % G of the pool (of layer `layer` when the pool is stacked [L, P, G, *])

Two implementations with one signature (`paged_attention(..., impl=)`):
  * 'jnp'    - the reference: gather the row's pages in table order ([B, M*G, R], a copy per layer and step)
               and run the dense masked softmax of `mla.latent_attention`.
  * 'pallas' - flash-decoding over pages: one program per (row, block of bq query rows), where a query row
               is one (token, head) pair, so all N heads of a token share each page read; an online
               softmax (running max, running sum, f32 accumulator [bq, R]) over the row's pages, reading
               each page straight from the pool (no gathered copy) and only the pages up to the block's
               last position. GPU: Triton, a loop over pages with the page index taken from the table row.
               TPU: Mosaic, grid (B, row blocks, M) with the page table as scalar prefetch choosing the
               pool block of each step; pages past the row's length repeat the last block index (no DMA)
               and skip the compute. On CPU it runs with interpret=True, which is how the tests check it
               against the reference.
Which one the engine runs is `Runtime.paged_attention` ('jnp' unless asked: the kernel is checked against
the reference on CPU and lowers for CUDA and TPU, but no accelerator run has yet shown where it pays).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dsv3_jax import runtime
from dsv3_jax.cli import UserError
from dsv3_jax.mla import latent_attention

_NEG = -1e30  # masked score: finite, so a block whose slots are all masked gives exp(0) = 1, never NaN


def gather_pages(pool, page_table):
    """[P, G, X] pool, [B, M] table -> [B, M * G, X]: each row's pages in table order, so gathered slot s is the
    row's position s (the plain-jnp read: a copy per layer and step)."""
    B, M = page_table.shape
    return pool[page_table].reshape(B, M * pool.shape[-2], pool.shape[-1])


def reference(q_abs, q_pe, c_pool, pe_pool, page_table, positions, *, scale, layer=None, keep=None):
    """The plain-jnp read: gather the pages in table order, dense masked softmax (and, given keep [B, T, S],
    only the slots sparse attention kept). -> o_lat [B, T, N, R] f32."""
    if layer is not None:
        c_pool, pe_pool = c_pool[layer], pe_pool[layer]
    c_kv, k_pe = gather_pages(c_pool, page_table), gather_pages(pe_pool, page_table)
    mask = jnp.arange(c_kv.shape[1])[None, None, :] <= positions[:, :, None]  # [B, T, S]
    if keep is not None:
        mask = mask & keep
    return latent_attention(q_abs, q_pe, c_kv, k_pe[..., : q_pe.shape[-1]], mask, scale)


# ---------------------------------------------------------------------------------------------- kernel body
def _page_update(q, qpe, qpos, c, pe, base, state, scale):
    """One page of the online softmax. q [bq, R], qpe [bq, dr], qpos [bq] int32, c [G, R], pe [G, dr]."""
    m_i, l_i, acc = state
    c, pe = c.astype(q.dtype), pe.astype(q.dtype)  # the core runs in the query dtype, as the reference
    dims = (((1,), (1,)), ((), ()))
    s = jax.lax.dot_general(q, c, dims, preferred_element_type=jnp.float32)
    s += jax.lax.dot_general(qpe, pe, dims, preferred_element_type=jnp.float32)
    s *= scale
    kpos = base + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where(kpos <= qpos[:, None], s, _NEG)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m_i - m_new)
    acc = acc * alpha[:, None] + jax.lax.dot_general(p.astype(c.dtype), c, (((1,), (0,)), ((), ())),
                                                     preferred_element_type=jnp.float32)
    return m_new, l_i * alpha + jnp.sum(p, axis=1), acc


def _init(bq, R):
    return (jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, R), jnp.float32))


def _finish(state):
    _, l_i, acc = state
    return acc / jnp.maximum(l_i, 1e-30)[:, None]  # l >= 1 for any row with a visible slot


def _kernel_triton(pt_ref, npages_ref, q_ref, qpe_ref, qpos_ref, c_ref, pe_ref, o_ref, *, G, scale):
    """Grid (B, row blocks). pt_ref [M] (this row's table), npages_ref [1], pools [L*P*G, X] (pool offsets
    already include the layer), q [bq, R], qpe [bq, dr], qpos [bq]."""
    q, qpe, qpos = q_ref[...], qpe_ref[...], qpos_ref[...]
    R = q.shape[-1]

    def body(m, state):
        start = pl.multiple_of(pt_ref[m] * G, G)
        c = c_ref[pl.ds(start, G), :]
        pe = pe_ref[pl.ds(start, G), :]
        return _page_update(q, qpe, qpos, c, pe, m * G, state, scale)

    state = jax.lax.fori_loop(0, npages_ref[0], body, _init(q.shape[0], R))
    o_ref[...] = _finish(state).astype(o_ref.dtype)


def _kernel_tpu(pt_ref, npages_ref, q_ref, qpe_ref, qpos_ref, c_ref, pe_ref, o_ref, m_sc, l_sc, acc_sc, *, G, scale):
    """Grid (B, row blocks, M); the pool blocks [G, X] are the page table's choice for (b, m)."""
    b, m = pl.program_id(0), pl.program_id(2)

    @pl.when(m == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(m < npages_ref[b])
    def _():
        state = (m_sc[:, 0], l_sc[:, 0], acc_sc[...])
        m_new, l_new, acc = _page_update(q_ref[...], qpe_ref[...], qpos_ref[:, 0], c_ref[...], pe_ref[...], m * G,
                                         state, scale)
        m_sc[...], l_sc[...], acc_sc[...] = m_new[:, None], l_new[:, None], acc

    @pl.when(m == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = _finish((m_sc[:, 0], l_sc[:, 0], acc_sc[...])).astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------- wrapper
def _pallas(q_abs, q_pe, c_pool, pe_pool, page_table, positions, *, scale, layer, block_q, backend, interpret):
    B, T, N, R = q_abs.shape
    dr = q_pe.shape[-1]
    M = page_table.shape[1]
    L = 1 if c_pool.ndim == 3 else c_pool.shape[0]
    P, G = c_pool.shape[-3], c_pool.shape[-2]
    if backend == "triton" and not interpret:
        for name, v in (("page size", G), ("kv_lora_rank", R), ("qk_rope_head_dim", dr)):
            if v < 16 or v & (v - 1):
                raise UserError(f"paged attention kernel (Triton): {name}={v} must be a power of two >= 16; run "
                                f"with paged_attention='jnp'")
    rows = T * N
    bq = block_q or min(64, max(16, 1 << (rows - 1).bit_length()))
    rows_p = -(-rows // bq) * bq
    dt = q_abs.dtype

    def flat(x):  # [B, T, N, X] -> [B, rows_p, X] in the query dtype
        x = x.reshape(B, rows, x.shape[-1]).astype(dt)
        return jnp.pad(x, ((0, 0), (0, rows_p - rows), (0, 0)))

    q, qpe = flat(q_abs), flat(q_pe)
    qpos = jnp.pad(jnp.repeat(positions.astype(jnp.int32), N, axis=1), ((0, 0), (0, rows_p - rows)),
                   constant_values=-1)  # [B, rows_p]: each (token, head) row sees its token's position
    npages = jnp.clip(jnp.max(positions, axis=1) // G + 1, 1, M).astype(jnp.int32)  # [B]
    table = page_table.astype(jnp.int32)
    lay = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
    out_shape = jax.ShapeDtypeStruct((B, rows_p, R), jnp.float32)
    nb = rows_p // bq
    if backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        c2, pe2 = c_pool.reshape(L * P * G, R), pe_pool.reshape(L * P * G, dr)
        table = table + lay * P  # pages of this layer's pool in the flattened [L*P*G, X] arrays
        Mp = 1 << (M - 1).bit_length()  # Triton loads power-of-two blocks
        table = jnp.pad(table, ((0, 0), (0, Mp - M)))
        out = pl.pallas_call(
            functools.partial(_kernel_triton, G=G, scale=scale),
            out_shape=out_shape,
            grid=(B, nb),
            in_specs=[pl.BlockSpec((None, Mp), lambda b, i: (b, 0)),
                      pl.BlockSpec((1,), lambda b, i: (b,)),
                      pl.BlockSpec((None, bq, R), lambda b, i: (b, i, 0)),
                      pl.BlockSpec((None, bq, dr), lambda b, i: (b, i, 0)),
                      pl.BlockSpec((None, bq), lambda b, i: (b, i)),
                      pl.BlockSpec((L * P * G, R), lambda b, i: (0, 0)),
                      pl.BlockSpec((L * P * G, dr), lambda b, i: (0, 0))],
            out_specs=pl.BlockSpec((None, bq, R), lambda b, i: (b, i, 0)),
            compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
            interpret=interpret, name="paged_mla_attention",
        )(table, npages, q, qpe, qpos, c2, pe2)
    else:
        from jax.experimental.pallas import tpu as pltpu

        c4, pe4 = c_pool.reshape(L, P, G, R), pe_pool.reshape(L, P, G, dr)

        def pool_block(b, i, m, pt, n, lay):  # pages past the row's length repeat the last one: no new DMA
            return lay[0], pt[b, jnp.minimum(m, n[b] - 1)], 0, 0

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(B, nb, M),
            in_specs=[pl.BlockSpec((None, bq, R), lambda b, i, m, pt, n, lay: (b, i, 0)),
                      pl.BlockSpec((None, bq, dr), lambda b, i, m, pt, n, lay: (b, i, 0)),
                      pl.BlockSpec((None, bq, 1), lambda b, i, m, pt, n, lay: (b, i, 0)),
                      pl.BlockSpec((None, None, G, R), pool_block),
                      pl.BlockSpec((None, None, G, dr), pool_block)],
            out_specs=pl.BlockSpec((None, bq, R), lambda b, i, m, pt, n, lay: (b, i, 0)),
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, R), jnp.float32)])

        def kernel(pt_ref, n_ref, lay_ref, *refs):
            return _kernel_tpu(pt_ref, n_ref, *refs, G=G, scale=scale)

        out = pl.pallas_call(
            kernel, out_shape=out_shape, grid_spec=grid_spec,
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=interpret, name="paged_mla_attention",
        )(table, npages, lay[None], q, qpe, qpos[..., None], c4, pe4)
    return out[:, :rows].reshape(B, T, N, R)


def paged_attention(q_abs, q_pe, c_pool, pe_pool, page_table, positions, *, scale, layer=None, impl="jnp",
                    backend="auto", interpret=None, block_q=None, keep=None):
    """Absorbed attention over a paged latent pool -> o_lat [B, T, N, R] float32.

    q_abs [B, T, N, R] (W_UK absorbed), q_pe [B, T, N, dr] (roped), c_pool [(L,) P, G, R], pe_pool [(L,) P, G, dr],
    page_table [B, M] int32, positions [B, T] (-1: padding, sees nothing useful), layer: index into a stacked
    pool. impl 'jnp' | 'pallas'; backend 'triton' | 'mosaic_tpu' | 'auto'; interpret (default: on CPU);
    block_q: (token, head) rows per program (default: up to 64); keep [B, T, M*G]: sparse attention's
    selection (V3.2; 'jnp' only), the pools' k_pe then carrying the indexer's keys after the rope channels.
    """
    if impl == "jnp":
        return reference(q_abs, q_pe, c_pool, pe_pool, page_table, positions, scale=scale, layer=layer, keep=keep)
    if impl != "pallas":
        raise UserError(f"paged attention impl={impl!r}: choose 'jnp' or 'pallas'")
    if keep is not None or pe_pool.shape[-1] != q_pe.shape[-1]:
        raise UserError("paged_attention='pallas' reads every slot up to a row's position: sparse attention "
                        "(index_topk > 0) is served with paged_attention='jnp'.", key="paged_attention")
    kw = dict(scale=scale, block_q=block_q, backend=runtime.fp8_backend(backend),
              interpret=runtime.fp8_interpret(interpret))
    return _partitioned(q_abs, q_pe, c_pool, pe_pool, page_table, positions, layer, **kw)


def _partitioned(q_abs, q_pe, c_pool, pe_pool, page_table, positions, layer, **kw):
    """`_pallas`, in its own `shard_map` under a mesh context (a Pallas kernel is opaque to XLA's partitioner:
    "Mosaic kernels cannot be automatically partitioned", as for the FP8 GEMMs, `fp8/gemm.py`): each device runs
    its rows (split over the batch axes) and its heads (split over 'tensor') against the whole pool, which the
    engine holds replicated over those axes. Without a mesh, inside `shard_map` already, or on one device, the
    kernel is called as it is."""
    from jax.sharding import PartitionSpec as P

    from dsv3_jax.sharding import BATCH_AXES

    mesh = jax.sharding.get_abstract_mesh()
    lay = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
    local = lambda q, qp, c, pe, t, pos, lay: _pallas(  # noqa: E731
        q, qp, c, pe, t, pos, layer=None if layer is None else lay, **kw)
    if mesh.empty or mesh.manual_axes or mesh.size == 1:
        return local(q_abs, q_pe, c_pool, pe_pool, page_table, positions, lay)
    if "stage" in mesh.axis_names and mesh.shape["stage"] > 1:
        raise UserError("paged_attention='pallas' on a mesh with pipeline stages: the kernel reads a whole pool per "
                        "device, and the engine splits the pools over 'stage' by layer; serve with "
                        "paged_attention='jnp' there.", key="paged_attention")

    def split(names, size):
        axes = [a for a in names if a in mesh.axis_names and mesh.shape[a] > 1]
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        return tuple(axes) or None

    rows, heads = split(BATCH_AXES, q_abs.shape[0]), split(("tensor",), q_abs.shape[2])
    q_spec = P(rows, None, heads, None)
    specs = (q_spec, q_spec, P(), P(), P(rows, None), P(rows, None), P())
    return jax.shard_map(local, in_specs=specs, out_specs=q_spec, check_vma=False)(
        q_abs, q_pe, c_pool, pe_pool, page_table, positions, lay)
