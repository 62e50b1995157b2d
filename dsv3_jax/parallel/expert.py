"""Expert parallelism: routed experts split over the mesh axis 'expert', tokens moved with all_to_all.

Shape legend: n local tokens, K top-k, M = n*K local token-expert rows, D model, F expert width,
ep = size of the 'expert' axis, E_loc = E / ep experts per rank, C rows per (source, destination) pair.

Inside `shard_map` (explicit collectives; everything else stays with XLA's SPMD partitioner), each
device holds its own tokens (the batch is split over data x fsdp x expert) and E_loc experts:

  1. every row (token t, choice k) goes to rank dst = expert // E_loc; its position in that rank's
     bucket is its running count among rows with the same dst (a cumsum of a one-hot);
  2. rows at position >= C are dropped (capacity C = ceil(capacity_factor * M / ep); capacity_factor
     <= 0 means C = M, which can never drop: dropless, at the price of ep x padding);
  3. send buffer [ep, C, D] -> `lax.all_to_all` -> the rows each rank must compute, with their local
     expert ids and a validity mask (padding rows get weight 0);
  4. local experts run in the Runtime's layout, as on one device (`experts.LocalExperts`: 'blocks' on CPU,
     'ragged' (ragged_dot) on GPU/TPU), then `all_to_all` sends results back and they are combined with the
     router weights.
All row moves are gathers in both directions (`experts.permute_rows`), so the backward pass is gathers
plus the transposed all_to_alls. Expert weights sharded over 'fsdp' on D are all-gathered inside;
sharded over 'tensor' on F, the partial down-projections are summed with psum.

Ragged dispatch (`dispatch='ragged'`, dropless only; the runtime resolver picks it on GPU/TPU when the
capacity factor is 0): rows are sorted by expert, so each destination rank's rows are one contiguous slice;
every rank learns all ranks' per-expert counts with one small all_gather ([ep, ep, E_loc] integers),
from which the send/receive sizes and offsets follow, and `lax.ragged_all_to_all` moves only the real
rows (no capacity padding on the wire). The receive buffer is static: dropless (capacity factor 0) it is
ep * M rows, the worst case of every rank sending everything to one, and the local experts run on all of it
(invalid rows weighted 0), which at V3's scale (ep 64, M = 32K rows) is 64x the work and memory of a balanced
step. With a capacity factor cf > 0 the buffer is R = ceil(cf * M) rows, cf times a balanced rank's load, and
the bound is on what a rank receives in all (the padded dispatch bounds every (source, destination) pair, so it
drops more at the same memory): the sources' slices are laid out in source order, and the rows that would land
at or past R are not sent (every rank computes every cut from the gathered counts) and are counted as dropped;
they contribute 0, as in the padded dispatch. A second ragged_all_to_all with the mirrored sizes/offsets
returns the results. XLA:CPU has no
ragged-all-to-all (REFERENCE.md section 9), so on CPU the same exchange is emulated with all_gather and
gathers (`_emulated_ragged_all_to_all`, identical semantics, test-only cost): the bookkeeping is
checked on CPU, and tests/test_parallel.py checks that the real op is what lowers for GPU.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax import runtime, sharding
from dsv3_jax.cli import UserError
from dsv3_jax.experts import LocalExperts, permute_rows
from dsv3_jax.fp8.resident import QWeight
from dsv3_jax.runtime import Fp8Options, Fp8Weights
from dsv3_jax.sharding import BATCH_AXES, logical_to_spec


def capacity(rows: int, ep: int, capacity_factor: float) -> int:
    """Rows each rank may send to each other rank (static)."""
    if capacity_factor <= 0:
        return rows
    return max(1, min(rows, math.ceil(capacity_factor * rows / ep)))


def _gather_fsdp(w_gate, w_up, w_down, sizes):
    """Expert weights arrive sharded over 'fsdp' on D: gather them (a reduce-scatter in the backward).
    FP8-resident weights ([E, N, K]: D is axis 2 of w_gate / w_up, axis 1 of w_down) gather their fp8
    values; their scales are replicated along the block axes."""
    if sizes.get("fsdp", 1) == 1:
        return w_gate, w_up, w_down
    gather = partial(jax.lax.all_gather, axis_name="fsdp", tiled=True)
    if isinstance(w_gate, QWeight):
        return (QWeight(gather(w_gate.q, axis=2), w_gate.s), QWeight(gather(w_up.q, axis=2), w_up.s),
                QWeight(gather(w_down.q, axis=1), w_down.s))
    return gather(w_gate, axis=1), gather(w_up, axis=1), gather(w_down, axis=2)


def _num_local_experts(w) -> int:
    return (w.q if isinstance(w, QWeight) else w).shape[0]


def _local_experts(x, idx, w, w_gate, w_up, w_down, *, block, capacity_factor, mesh_axes, sizes, fp8=None,
                   fp8_weights=None, impl="blocks", loop=False):
    ep = sizes["expert"]
    n, K = idx.shape
    M, D = n * K, x.shape[1]
    w_gate, w_up, w_down = _gather_fsdp(w_gate, w_up, w_down, sizes)
    e_loc = _num_local_experts(w_gate)
    C = capacity(M, ep, capacity_factor)

    flat = idx.reshape(-1)
    dst, eid = flat // e_loc, flat % e_loc
    rank = jnp.take_along_axis(jnp.cumsum(jax.nn.one_hot(dst, ep, dtype=jnp.int32), axis=0),
                               dst[:, None], axis=1)[:, 0] - 1
    keep = rank < C
    slot = jnp.where(keep, dst * C + rank, ep * C).astype(jnp.int32)  # ep*C: dropped
    src = jnp.full((ep * C,), M, jnp.int32).at[slot].set(jnp.arange(M, dtype=jnp.int32), mode="drop")
    valid = src < M

    send = permute_rows(jnp.repeat(x, K, axis=0), src, slot).reshape(ep, C, D)
    send_eid = jnp.where(valid, eid[jnp.minimum(src, M - 1)], 0).reshape(ep, C)
    a2a = partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0)
    with jax.named_scope("dispatch"):
        recv, recv_eid, recv_valid = a2a(send), a2a(send_eid), a2a(valid.reshape(ep, C))

    local = LocalExperts(impl, block, fp8, fp8_weights, loop)
    y = local(recv.reshape(ep * C, D), recv_eid.reshape(-1, 1), recv_valid.reshape(-1, 1).astype(jnp.float32),
              w_gate, w_up, w_down)[0]
    if sizes.get("tensor", 1) > 1:  # F was split: partial sums of the down projection
        y = jax.lax.psum(y, "tensor")
    with jax.named_scope("combine"):
        back = a2a(y.astype(x.dtype).reshape(ep, C, D)).reshape(ep * C, D)
    rows = permute_rows(back, slot, src).reshape(n, K, D)
    out = jnp.einsum("NK,NKD->ND", w, rows.astype(jnp.float32))
    dropped = jax.lax.psum(jnp.sum(~keep).astype(jnp.float32), mesh_axes)
    return out, dropped


def experts_expert_parallel(x, idx, w, w_gate, w_up, w_down, *, mesh, block: int, capacity_factor: float,
                            fp8: Fp8Options | None = None, dispatch: str = "padded", emulate: bool | None = None,
                            fp8_weights: Fp8Weights | None = None, impl: str = "blocks", loop: bool = False):
    """x [N, D], idx/w [N, K] (global, split over the batch axes), weights [E, D, F] / [E, F, D].
    dispatch: 'padded' (all_to_all, capacity per (source, destination) pair) or 'ragged' (ragged_all_to_all;
    dropless, or with a capacity factor a receive buffer of ceil(cf * M) rows per rank).
    emulate: ragged exchange through all_gather (default: on CPU only; False forces the real op, e.g. to
    lower for a GPU from a CPU machine). impl: the layout the local experts run in ('blocks', 'ragged'
    (ragged_dot), 'mgpu', 'dense': `experts.LocalExperts`); the Runtime passes its expert_impl ('ragged' on
    GPU/TPU); loop: 'blocks' GEMMs as a loop over the used blocks (`experts.swiglu_block_loop`, the Runtime's
    choice on CPU). fp8: FP8 grouped GEMMs for the local experts with these options.
    FP8-resident weights come as `QWeight`s ([E, F, D] / [E, D, F] with block scales) and run with
    `fp8_weights`; they need tensor=1 (a tensor-split F would cut through the 128x128 scale blocks).

    Returns (y [N, D] float32, number of dropped token-expert rows in the global batch).
    """
    if dispatch not in ("padded", "ragged"):
        raise UserError(f"expert dispatch={dispatch!r}: choose 'padded' or 'ragged' (dsv3_jax.runtime.resolve "
                        f"turns 'auto' into one of them).")
    sizes = dict(mesh.shape)
    batch = P(BATCH_AXES, None)
    wspec = logical_to_spec(("experts", "embed", "expert_mlp"))
    dspec = logical_to_spec(("experts", "expert_mlp", "embed"))
    if isinstance(w_gate, QWeight):  # [E, N, K] fp8 values; scales split over experts only
        if sizes.get("tensor", 1) > 1:
            raise UserError("FP8-resident experts under expert parallelism need mesh tensor=1 (a tensor-split "
                            "expert width would cut through the 128x128 scale blocks); put the devices on "
                            "'expert' or 'data' instead.")
        sspec = logical_to_spec(("experts", None, None))
        wspec = QWeight(logical_to_spec(("experts", "expert_mlp", "embed")), sspec)
        dspec = QWeight(logical_to_spec(("experts", "embed", "expert_mlp")), sspec)
    if dispatch == "ragged":
        fn = partial(_local_experts_ragged, block=block, capacity_factor=capacity_factor,
                     mesh_axes=tuple(a for a in BATCH_AXES if a in mesh.axis_names), sizes=sizes, fp8=fp8,
                     fp8_weights=fp8_weights, impl=impl, loop=loop,
                     emulate=runtime.platform() == "cpu" if emulate is None else emulate)
    else:
        fn = partial(_local_experts, block=block, capacity_factor=capacity_factor,
                     mesh_axes=tuple(a for a in BATCH_AXES if a in mesh.axis_names), sizes=sizes, fp8=fp8,
                     fp8_weights=fp8_weights, impl=impl, loop=loop)
    with jax.named_scope("expert_parallel"):
        return jax.shard_map(fn, mesh=sharding.inner_mesh(mesh), in_specs=(batch, batch, batch, wspec, wspec, dspec),
                             out_specs=(batch, P()), check_vma=False)(x, idx, w, w_gate, w_up, w_down)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Expert strategy: routed experts split over the mesh axis 'expert', rows exchanged with (ragged)
    all_to_all; the local experts run in layout `impl` (`experts.LocalExperts`)."""

    mesh: jax.sharding.Mesh
    block: int
    capacity_factor: float = 0.0
    dispatch: str = "padded"
    emulate: bool = False
    fp8: Fp8Options | None = None
    fp8_weights: Fp8Weights | None = None
    impl: str = "blocks"  # the local experts' layout (experts.LocalExperts): the Runtime's expert_impl
    loop: bool = False  # 'blocks': the GEMMs as a loop over the used blocks (the Runtime's expert_blocks_loop)

    def __call__(self, x, idx, w, w_gate, w_up, w_down):
        return experts_expert_parallel(x, idx, w, w_gate, w_up, w_down, mesh=self.mesh, block=self.block,
                                       capacity_factor=self.capacity_factor, fp8=self.fp8, dispatch=self.dispatch,
                                       emulate=self.emulate, fp8_weights=self.fp8_weights, impl=self.impl,
                                       loop=self.loop)


# ----------------------------------------------------------------------------- ragged dispatch


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
    """`lax.ragged_all_to_all` semantics (one slice per peer) from all_gather + gathers, for XLA:CPU."""
    del send_sizes  # implied by recv_sizes on the other side
    ops = jax.lax.all_gather(operand, axis_name)  # [ep, rows, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)  # [src, dst]
    out_off = jax.lax.all_gather(output_offsets, axis_name)  # [src, dst]
    me = jax.lax.axis_index(axis_name)
    starts = out_off[:, me]  # where each source's slice lands in my output
    j = jnp.arange(output.shape[0])
    hit = (j[None] >= starts[:, None]) & (j[None] < (starts + recv_sizes)[:, None])  # [ep, R]
    src = jnp.argmax(hit, axis=0)
    row = jnp.clip(in_off[src, me] + j - starts[src], 0, operand.shape[0] - 1)
    got = ops[src, row]
    mask = hit.any(0).reshape((-1,) + (1,) * (output.ndim - 1))
    return jnp.where(mask, got, output)


def _local_experts_ragged(x, idx, w, w_gate, w_up, w_down, *, block, capacity_factor, mesh_axes, sizes, emulate,
                          fp8=None, fp8_weights=None, impl="blocks", loop=False):
    ep = sizes["expert"]
    n, K = idx.shape
    M, D = n * K, x.shape[1]
    w_gate, w_up, w_down = _gather_fsdp(w_gate, w_up, w_down, sizes)
    e_loc = _num_local_experts(w_gate)
    a2a = partial(_emulated_ragged_all_to_all if emulate else jax.lax.ragged_all_to_all, axis_name="expert")

    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # rows grouped by expert, hence by rank
    inv = jnp.zeros(M, jnp.int32).at[order].set(jnp.arange(M, dtype=jnp.int32))
    send = permute_rows(jnp.repeat(x, K, axis=0), order, inv)
    mine = jnp.bincount(flat, length=ep * e_loc).reshape(ep, e_loc).astype(jnp.int32)  # [dst, e_loc]
    counts = jax.lax.all_gather(mine, "expert")  # [src, dst, e_loc]: every rank's rows per expert
    # static receive buffer: the worst case (dropless), or cf x a balanced rank's M rows
    R = ep * M if capacity_factor <= 0 else max(1, min(ep * M, math.ceil(capacity_factor * M)))
    wanted = counts.sum(-1)  # [src, dst]: rows each source has for each destination
    in_off = jnp.cumsum(wanted, axis=1) - wanted  # slice start in the sender's sorted rows
    if R < ep * M:  # cut each source's slice where the receiver's buffer ends (sources laid out in order)
        start = jnp.cumsum(counts, axis=2) - counts  # [src, dst, e]: start of each expert's rows in src's slice
        before = jnp.cumsum(counts.sum(-1), axis=0) - counts.sum(-1)  # [src, dst]: rows from earlier sources
        counts = jnp.clip(R - before[..., None] - start, 0, counts)  # rows of each expert that still fit
    sizes_sd = counts.sum(-1)  # [src, dst]: rows sent (and received): a prefix of each slice
    me = jax.lax.axis_index("expert")
    out_off = jnp.cumsum(sizes_sd, axis=0) - sizes_sd  # slice start in the receiver's buffer (sources in order)

    with jax.named_scope("dispatch"):
        recv = a2a(send, jnp.zeros((R, D), send.dtype), in_off[me], sizes_sd[me], out_off[me], sizes_sd[:, me])
    ends = jnp.cumsum(counts[:, me, :].reshape(-1))  # buffer order: source-major, local expert minor
    rows = jnp.arange(R)
    seg = jnp.minimum(jnp.searchsorted(ends, rows, side="right"), ep * e_loc - 1)
    valid = (rows < ends[-1]).astype(jnp.float32)
    local = LocalExperts(impl, block, fp8, fp8_weights, loop)
    y = local(recv, (seg % e_loc)[:, None].astype(jnp.int32), valid[:, None], w_gate, w_up, w_down)[0]
    if sizes.get("tensor", 1) > 1:
        y = jax.lax.psum(y, "tensor")
    with jax.named_scope("combine"):  # (rows that were not sent come back as zeros)
        back = a2a(y.astype(x.dtype), jnp.zeros((M, D), x.dtype), out_off[:, me], sizes_sd[:, me], in_off[:, me],
                   sizes_sd[me])
    out_rows = permute_rows(back, inv, order).reshape(n, K, D)
    out = jnp.einsum("NK,NKD->ND", w, out_rows.astype(jnp.float32))
    if R == ep * M:
        return out, jnp.zeros((), jnp.float32)
    dropped = (M - sizes_sd[me].sum()).astype(jnp.float32)  # my rows that did not fit where they were going
    return out, jax.lax.psum(dropped, mesh_axes)
