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
  4. local experts run with the same per-expert block layout as the single-device path
     (`moe.experts_blocks`), then `all_to_all` sends results back and they are combined with the
     router weights.
All row moves are gathers in both directions (`moe.permute_rows`), so the backward pass is gathers
plus the transposed all_to_alls. Expert weights sharded over 'fsdp' on D are all-gathered inside;
sharded over 'tensor' on F, the partial down-projections are summed with psum.

`jax.lax.ragged_all_to_all` would avoid the padding, but XLA:CPU cannot run it (REFERENCE.md
section 9); this padded path runs on every backend and is what the tests check.
"""
from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax.moe import experts_blocks, permute_rows
from dsv3_jax.sharding import BATCH_AXES, logical_to_spec


def capacity(rows: int, ep: int, capacity_factor: float) -> int:
    """Rows each rank may send to each other rank (static)."""
    if capacity_factor <= 0:
        return rows
    return max(1, min(rows, math.ceil(capacity_factor * rows / ep)))


def _local_experts(x, idx, w, w_gate, w_up, w_down, *, block, capacity_factor, mesh_axes, sizes, fp8=False):
    ep = sizes["expert"]
    n, K = idx.shape
    M, D = n * K, x.shape[1]
    if sizes.get("fsdp", 1) > 1:  # weights arrive sharded on D: gather them (reduce-scatter in backward)
        w_gate = jax.lax.all_gather(w_gate, "fsdp", axis=1, tiled=True)
        w_up = jax.lax.all_gather(w_up, "fsdp", axis=1, tiled=True)
        w_down = jax.lax.all_gather(w_down, "fsdp", axis=2, tiled=True)
    e_loc = w_gate.shape[0]
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
    recv, recv_eid, recv_valid = a2a(send), a2a(send_eid), a2a(valid.reshape(ep, C))

    y = experts_blocks(recv.reshape(ep * C, D), recv_eid.reshape(-1, 1),
                       recv_valid.reshape(-1, 1).astype(jnp.float32), w_gate, w_up, w_down, block, fp8)
    if sizes.get("tensor", 1) > 1:  # F was split: partial sums of the down projection
        y = jax.lax.psum(y, "tensor")
    back = a2a(y.astype(x.dtype).reshape(ep, C, D)).reshape(ep * C, D)
    rows = permute_rows(back, slot, src).reshape(n, K, D)
    out = jnp.einsum("NK,NKD->ND", w, rows.astype(jnp.float32))
    dropped = jax.lax.psum(jnp.sum(~keep).astype(jnp.float32), mesh_axes)
    return out, dropped


def experts_expert_parallel(x, idx, w, w_gate, w_up, w_down, *, mesh, block: int, capacity_factor: float,
                            fp8: bool = False):
    """x [N, D], idx/w [N, K] (global, split over the batch axes), weights [E, D, F] / [E, F, D].

    Returns (y [N, D] float32, number of dropped token-expert rows in the global batch).
    """
    sizes = dict(mesh.shape)
    batch = P(BATCH_AXES, None)
    wspec = logical_to_spec(("experts", "embed", "expert_mlp"))
    dspec = logical_to_spec(("experts", "expert_mlp", "embed"))
    fn = partial(_local_experts, block=block, capacity_factor=capacity_factor, mesh_axes=tuple(mesh.axis_names),
                 sizes=sizes, fp8=fp8)
    return jax.shard_map(fn, mesh=mesh, in_specs=(batch, batch, batch, wspec, wspec, dspec),
                         out_specs=(batch, P()), check_vma=False)(x, idx, w, w_gate, w_up, w_down)
