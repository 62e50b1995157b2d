"""Pipeline parallelism over the mesh axis 'stage': a GPipe schedule written as one `lax.scan`.

Shape legend: S stages (size of 'stage'), L stacked layers of one stack, Ls = L / S layers per stage,
M micro-batches, B global batch, b = B / M rows per micro-batch, T tokens, D model, E routed experts.

Layout. A layer stack's parameters carry a leading 'layers' axis sharded over 'stage' (the rules
table), so device group s already holds layers [s*Ls, (s+1)*Ls). Here they are viewed as [S, Ls, ...]
with dim 0 on 'stage', and the batch is cut into M micro-batches (micro-batch m = rows m, m+M, ...,
so every data/fsdp/expert shard owns an equal slice of each micro-batch).

Schedule (GPipe, all forwards then all backwards). A state buffer [S, b, T, D], sharded on 'stage',
holds what each stage works on. Each of the M + S - 1 iterations
  1. injects micro-batch t into stage 0's slot (t < M),
  2. runs every stage at once on its slot: `jax.vmap(stage, spmd_axis_name='stage')`, where `stage`
     scans its Ls layers (with remat if asked). Under SPMD each device group computes only its own
     stage; expert parallelism (the `shard_map` all_to_all of `parallel/expert.py`, dropless or with
     capacity) and FSDP (weights sharded on 'fsdp', gathered per layer by XLA) work inside it as usual,
  3. records the last stage's slot as finished micro-batch t - (S - 1),
  4. moves every slot one stage on with `lax.ppermute` over 'stage' (stage s -> s + 1).
Stage s is busy in iterations s .. s + M - 1 and idle (computing on a dummy slot whose results are
masked out) in the other S - 1, so the bubble fraction is

    bubble = (S - 1) / (M + S - 1)          e.g. S = 4, M = 16: 15.8 %.

The backward pass is the reverse scan that `jax.grad` derives: the ppermutes transpose to ppermutes
in the opposite direction, so gradients flow back through the stages in the mirror-image schedule.
Per-layer expert counts and balance losses are summed over the micro-batches each stage really
processed, so the router-bias update and MaxVio see exactly the global-batch loads; with dropless
routing the loss equals the unpipelined model's (tests/test_parallel.py).

What this is not: GPipe keeps the activations of all M micro-batches of a stage's layers until the
backward (use `train.remat` to keep only block inputs); each stack must divide by S; embedding, head and
the MTP modules run outside the pipeline, replicated over 'stage' (each stage group computes them on its
data shard); the dense and MoE stacks are pipelined one after the other. This is the reference schedule
(`config.mesh.pipeline_schedule=gpipe`).

The other schedules -- `1f1b` and `interleaved` (v = `config.mesh.pipeline_chunks` chunks per stage) -- run
as one SPMD program that owns the whole step's loss and gradients (`pipeline_exec.py`), over any layer mix
split unevenly into contiguous stages (`stage_layout.py`), following the tick tables of `schedules.py`.
S = 4, M = 8, stages 0 and 3, one cell per tick (forward: the micro-batch digit; backward: letter A + m):

    gpipe        s0 0. 1. 2. 3. 4. 5. 6. 7. .. .. .. .. .. .. .H .G .F .E .D .C .B .A
                 s3 .. .. .. 0. 1. 2. 3. 4. 5. 6. 7. .H .G .F .E .D .C .B .A .. .. ..
    1f1b         s0 0. 1. 2. 3. 4. 5. 6A 7B .C .D .E .F .G .H
                 s3 .. .. .. 0A 1B 2C 3D 4E 5F 6G 7H .. .. ..
    interleaved  s0 0. 1. 2. 3. 0. 1. 2. 3. 4. 5. 6A 7B 4C 5D 6A 7B .C .D .E .F .G .H .E .F .G .H
                 s3 .. .. .. 0. 1. 2. 3. 0A 1B 2C 3D 4A 5B 6C 7D 4E 5F 6G 7H .E .F .G .H .. .. ..

Counted bubble (F 1, B 2; each tick as long as its busiest stage) and stage inputs held by stage 0
(`benchmarks/pipeline_schedules.py`):

    S   M   gpipe          1f1b           interleaved v=2
    2   4   20.0%, 4       20.0%, 3       11.1%, 5
    4   8   27.3%, 8       27.3%, 7       15.8%, 11
    16  32  31.9%, 32      31.9%, 31      19.0%, 47

DeepSeek-V3 over stage 16 x expert 64 x data 2 (`train.py --dry_run`, 32 micro-batches, seq 4096), per device:
no ghost parameters; params / grads / AdamW stored 6.5 / 6.5 / 13.0 GiB, pooled layers borrowed for the step
(with their gradient sums) 22.2 GiB (interleaved v=2: 29.6), activations 52.8 (gpipe) / 45.8 (1f1b) / 49.3 GiB
(interleaved), FLOP imbalance 1.213 (interleaved 1.460).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv3_jax import sharding
from dsv3_jax.cli import UserError
from dsv3_jax.layer_stats import LayerStats


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of each stage in the GPipe schedule: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def check_microbatches(batch: int, microbatches: int, data_shards: int) -> None:
    """Every micro-batch must split evenly over the data shards (data x fsdp x expert)."""
    if microbatches < 1 or batch % microbatches or (batch // microbatches) % data_shards:
        raise UserError(f"config.mesh.microbatches={microbatches}: the batch of {batch} sequences must split into "
                        f"that many micro-batches, each divisible by data x fsdp x expert = {data_shards}; choose "
                        f"microbatches so that batch_size is a multiple of microbatches x {data_shards}.")


def _shift(buf, mesh, stages: int):
    """Slot of stage s -> stage s + 1 (the last wraps to 0, where the next injection overwrites it)."""
    perm = [(i, (i + 1) % stages) for i in range(stages)]
    return jax.shard_map(lambda b: jax.lax.ppermute(b, "stage", perm), mesh=mesh, in_specs=P("stage"),
                         out_specs=P("stage"), axis_names={"stage"}, check_vma=False)(buf)


def pipeline_blocks(stack, x, cos, sin, *, mesh, microbatches: int, remat: bool):
    """Apply a stacked Block (L layers, sharded over 'stage' of `mesh`) to x [B, T, D] as an S-stage pipeline.

    Returns x [B, T, D] and the layers' LayerStats [L, ...] -- the same as `stack.scan_blocks`.
    """
    S, M = int(mesh.shape["stage"]), microbatches
    graphdef, state = nnx.split(stack)
    L = jax.tree.leaves(state)[0].shape[0]
    if L % S:
        raise UserError(f"{L} stacked layers do not split into {S} pipeline stages")
    B, T, D = x.shape
    check_microbatches(B, M, math.prod(int(mesh.shape.get(a, 1)) for a in sharding.BATCH_AXES))
    b = B // M

    # [L, ...] -> [S, Ls, ...] with the stage dim on 'stage' and the rest as the rules table says
    specs = sharding.state_specs(state)

    def restage(spec, var):
        a = var.get_value()
        a = a.reshape(S, L // S, *a.shape[1:])
        return var.replace(jax.lax.with_sharding_constraint(a, P("stage", None, *tuple(spec)[1:])))

    state = jax.tree.map(restage, specs, state, is_leaf=lambda s: isinstance(s, P))

    def to_micro(a):  # [B, ...] -> [M, b, ...], micro-batch m = rows m, m + M, ...
        a = a.reshape(b, M, *a.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(a, (None, "batch") + (None,) * (a.ndim - 2))

    xs, cos_m, sin_m = to_micro(x), to_micro(cos), to_micro(sin)

    def stage_fn(stage_state, h, c, s):
        def body(h, layer_state):
            h, stats = nnx.merge(graphdef, layer_state)(h, c, s)
            return sharding.constrain(h, ("batch", None, None)), stats

        if remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        return jax.lax.scan(body, h, stage_state)

    run_stages = jax.vmap(stage_fn, spmd_axis_name="stage")
    stage_ids = jnp.arange(S)
    slot_spec = ("stages", "batch", None, None)

    def iteration(carry, t):
        buf, outs, acc = carry
        micro = t - stage_ids  # the micro-batch each stage works on in this iteration
        valid = (micro >= 0) & (micro < M)
        micro = jnp.clip(micro, 0, M - 1)
        first = (stage_ids == 0)[:, None, None, None]
        buf = jnp.where(first, xs[jnp.minimum(t, M - 1)][None], buf)
        buf = sharding.constrain(buf, slot_spec)
        buf, stats = run_stages(state, buf, cos_m[micro], sin_m[micro])  # stats [S, Ls, ...]
        acc = jax.tree.map(lambda a, s: a + jnp.where(valid.reshape((S,) + (1,) * (s.ndim - 1)), s, 0.0),
                           acc, stats)
        done = t - (S - 1)
        finished = jax.lax.dynamic_update_index_in_dim(outs, buf[S - 1], jnp.maximum(done, 0), 0)
        outs = jnp.where(done >= 0, finished, outs)
        buf = _shift(buf, mesh, S)
        return (buf, outs, acc), None

    init = (sharding.constrain(jnp.zeros((S, b, T, D), x.dtype), slot_spec), jnp.zeros_like(xs),
            LayerStats.zeros(stack.num_experts, (S, L // S)))
    with jax.named_scope("pipeline"):
        (_, outs, stats), _ = jax.lax.scan(iteration, init, jnp.arange(M + S - 1))
    out = outs.swapaxes(0, 1).reshape(B, T, D)
    stats = jax.tree.map(lambda a: a.reshape((L,) + a.shape[2:]), stats).per_microbatch(M)
    return sharding.constrain(out, ("batch", None, None)), stats


@dataclasses.dataclass(frozen=True)
class PipelineStack:
    """Stack strategy: the layers split over the mesh axis 'stage', `microbatches` per step, GPipe."""

    mesh: jax.sharding.Mesh
    microbatches: int
    remat: bool = False
    schedule: str = "gpipe"

    def __call__(self, stack, x, cos, sin):
        return pipeline_blocks(stack, x, cos, sin, mesh=self.mesh, microbatches=self.microbatches, remat=self.remat)
