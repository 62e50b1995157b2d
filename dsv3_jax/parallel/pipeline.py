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

What this is not: DeepSeek-V3's DualPipe (bidirectional, overlapping forward/backward chunks with
the all_to_all traffic) or 1F1B. GPipe keeps the activations of all M micro-batches of a stage's
layers until the backward (use `train.remat` to keep only block inputs). Embedding, head and the MTP
modules run outside the pipeline, replicated over 'stage' (each stage group computes them on its
data shard); the dense and MoE stacks are pipelined one after the other.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv3_jax import sharding
from dsv3_jax.cli import UserError


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of each stage in the GPipe schedule: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def default_microbatches(stages: int) -> int:
    return 2 * stages if stages > 1 else 1


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


def pipeline_blocks(stack, x, cos, sin, *, microbatches: int, remat: bool, moe_impl=None):
    """Apply a stacked Block (L layers, sharded over 'stage') to x [B, T, D] as an S-stage pipeline.

    Returns x [B, T, D], counts [L, E], balance [L], dropped rows [L] -- the same as `model.scan_blocks`.
    """
    mesh = sharding.current_mesh()
    S, M = sharding.axis_size("stage"), microbatches
    graphdef, state = nnx.split(stack)
    L = jax.tree.leaves(state)[0].shape[0]
    if L % S:
        raise UserError(f"{L} stacked layers do not split into {S} pipeline stages")
    B, T, D = x.shape
    check_microbatches(B, M, sharding.axis_size("data") * sharding.axis_size("fsdp") * sharding.axis_size("expert"))
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
            h, *stats = nnx.merge(graphdef, layer_state)(h, c, s, moe_impl)
            return sharding.constrain(h, ("batch", None, None)), tuple(stats)

        if remat:
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        h, (counts, bal, dropped) = jax.lax.scan(body, h, stage_state)
        return h, counts, bal, dropped

    run_stages = jax.vmap(stage_fn, spmd_axis_name="stage")
    stage_ids = jnp.arange(S)
    slot_spec = ("stages", "batch", None, None)

    def iteration(carry, t):
        buf, outs, counts_acc, bal_acc, drop_acc = carry
        micro = t - stage_ids  # the micro-batch each stage works on in this iteration
        valid = (micro >= 0) & (micro < M)
        micro = jnp.clip(micro, 0, M - 1)
        first = (stage_ids == 0)[:, None, None, None]
        buf = jnp.where(first, xs[jnp.minimum(t, M - 1)][None], buf)
        buf = sharding.constrain(buf, slot_spec)
        buf, counts, bal, dropped = run_stages(state, buf, cos_m[micro], sin_m[micro])
        counts_acc = counts_acc + jnp.where(valid[:, None, None], counts, 0.0)
        bal_acc = bal_acc + jnp.where(valid[:, None], bal, 0.0)
        drop_acc = drop_acc + jnp.where(valid[:, None], dropped, 0.0)
        done = t - (S - 1)
        finished = jax.lax.dynamic_update_index_in_dim(outs, buf[S - 1], jnp.maximum(done, 0), 0)
        outs = jnp.where(done >= 0, finished, outs)
        buf = _shift(buf, mesh, S)
        return (buf, outs, counts_acc, bal_acc, drop_acc), None

    E = stack.num_experts
    init = (sharding.constrain(jnp.zeros((S, b, T, D), x.dtype), slot_spec), jnp.zeros_like(xs),
            jnp.zeros((S, L // S, E), jnp.float32), jnp.zeros((S, L // S), jnp.float32),
            jnp.zeros((S, L // S), jnp.float32))
    (_, outs, counts, bal, dropped), _ = jax.lax.scan(iteration, init, jnp.arange(M + S - 1))
    out = outs.swapaxes(0, 1).reshape(B, T, D)
    return (sharding.constrain(out, ("batch", None, None)), counts.reshape(L, E), bal.reshape(L) / M,
            dropped.reshape(L))
