"""The dry run's pipeline plan: the scheduled pipeline of a model over a mesh with stages, on paper.

What `train.py --dry_run` prints when config.mesh.stage > 1, from the abstract model (nothing allocated): the
stage layout (`stage_layout.py`) and its FLOP imbalance, the bubble counted from the schedule's tick table
(`schedules.py`), and per-device bytes of the train state as train.py holds it in the slot layout
(`slot_state.py`: resident slots, the 1/S share of pooled layers, the ends split over 'stage') with what is
brought whole for the step (borrowed pooled layers, gathered ends) counted apart.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from dsv3_jax import param_kinds, sharding
from dsv3_jax.parallel.pipeline import slot_state


def pipeline_plan(model, sizes: dict, batch_size: int, seq_len: int, microbatches: int, schedule: str,
                  chunks: int = 1, stage_layers: str = "", remat: bool = False) -> dict:
    """The scheduled pipeline of `model` on a mesh of `sizes` (parallel/executor.py): layout, FLOP
    imbalance, counted bubble, and per-device parameter and activation bytes (the slot layout, `slot_state.py`:
    each stage's resident slots, its 1/S share of the pooled blocks, embedding, head and MTP split over 'stage'
    as train.py stores them, `slot_state.end_spec`; what is brought whole for the step counted apart)."""
    from dsv3_jax.parallel.pipeline import schedules, stage_layout

    S = sizes["stage"]
    layout = stage_layout.plan(model, S * chunks, seq_len, stage_layers)
    table = schedules.table(schedule, S, microbatches, chunks)
    state = nnx.state(model, nnx.Param)
    specs = sharding.pure_specs(state)
    per_block = {"dense": 0, "moe": 0}  # one block's bytes on a device, whole (a resident or borrowed slot)
    pool_share = {"dense": 0, "moe": 0}  # one pooled block's bytes on a device (its 1/S piece)
    whole_in_pool = {"dense": 0, "moe": 0}  # parameters of a block's leaves the pool cannot split (held whole)
    ends = ends_whole = 0  # stored (split over 'stage' too) / gathered during the step
    for path, var in nnx.to_flat_state(state):
        spec = specs
        for k in path:
            spec = spec[k]
        a = var.get_value()
        item = jnp.dtype(a.dtype).itemsize
        names = param_kinds.path_names(path)
        if names[0] in ("dense_layers", "moe_layers"):
            kind = names[0].split("_")[0]
            per_block[kind] += sharding.shard_numel(a.shape[1:], tuple(spec)[1:], sizes) * item
            pooled = slot_state.pool_spec(a.shape, spec, sizes)
            pool_share[kind] += sharding.shard_numel(a.shape[1:], tuple(pooled)[1:], sizes) * item
            if slot_state.pool_split_dim(pooled) is None:
                whole_in_pool[kind] += math.prod(a.shape[1:])
        else:
            ends += sharding.shard_numel(a.shape, slot_state.end_spec(a.shape, spec, sizes), sizes) * item
            ends_whole += sharding.shard_numel(a.shape, tuple(None if x == "stage" else x for x in spec), sizes) * item
    kinds = layout.kinds()
    params = ends + sum(per_block[k] * layout.resident_slots[k] * chunks + pool_share[k] * layout.pooled_blocks(k)
                        for k in kinds)
    borrowed = sum(per_block[k] * layout.borrowed_slots(k) * chunks for k in kinds)
    ghosts = layout.ghost_params + sum((S - 1) * whole_in_pool[k] * layout.pooled_blocks(k) for k in kinds)
    dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    micro_tokens = -(-batch_size // (microbatches * dp)) * seq_len
    act_item = jnp.dtype(model.cfg.compute_dtype).itemsize
    held = (table.x_slots + table.dy_slots) * micro_tokens * model.cfg.hidden_size * act_item
    cfg = model.cfg
    working_per_layer = (24 * cfg.hidden_size + 2 * cfg.num_attention_heads * seq_len
                         + 3 * cfg.num_experts_per_tok * cfg.moe_intermediate_size) * act_item * micro_tokens
    chunk_layers = max(len(layout.blocks(q)) for q in range(layout.stages))
    working = working_per_layer * (1 if remat else chunk_layers)  # one chunk's recompute during a B
    costs = [layout.stage_cost(q) for q in range(layout.stages)]
    return {"layout": layout, "table": table, "params": params, "grads": params, "adam_moments": 2 * params,
            "activations": held + working, "ends_gathered": 2 * ends_whole, "borrowed": 2 * borrowed,
            "held_inputs": max(table.peak_live), "imbalance": layout.imbalance(S), "costs": costs,
            "ghost_params": ghosts}


def print_pipeline_plan(model, sizes, batch_size, seq_len, microbatches, schedule, chunks=1, stage_layers="",
                        remat=False) -> dict:
    from dsv3_jax.parallel.pipeline import schedules

    p = pipeline_plan(model, sizes, batch_size, seq_len, microbatches, schedule, chunks, stage_layers, remat)
    lay, tbl = p["layout"], p["table"]
    S = sizes["stage"]
    gib = 1024 ** 3
    print(f"\npipeline: schedule {schedule}, {S} stages x {chunks} chunk(s), {microbatches} micro-batches "
          f"(parallel/executor.py)")
    for q in range(lay.stages):
        where = f"stage {q % S}" + (f" chunk {q // S}" if chunks > 1 else "")
        print(f"  {where:<16} {lay.describe(q):<48} {p['costs'][q] / 1e9:8.2f} GFLOP/token")
    print(f"  FLOP imbalance (max / mean over stages): {p['imbalance']:.3f}")
    total = lay.costs.total_params
    pooled = ", ".join(f"{lay.pooled_blocks(k)} {k}" for k in lay.kinds())
    print(f"  ghost parameters: {p['ghost_params'] / 1e9:.1f}B ({p['ghost_params'] / total:.1%} of the model). "
          f"Resident slots per stage: {', '.join(f'{lay.resident_slots[k]} {k}' for k in lay.kinds())} "
          f"({lay.ghost_blocks('dense')} dense + {lay.ghost_blocks('moe')} MoE of them padding); "
          f"pooled over 'stage' (1/S stored per device, borrowed whole by their stage for the step): {pooled} "
          f"blocks = {lay.pooled_params / 1e9:.1f}B ({lay.pooled_params / total:.1%}); slots run masked: "
          f"{lay.empty_slots('dense')} dense + {lay.empty_slots('moe')} MoE")
    print(f"  bubble: {tbl.bubble:.1%} counted from the {tbl.ticks}-tick schedule (formula "
          f"{schedules.bubble_formula(schedule, S, microbatches, chunks):.1%}); stage inputs held per stage: "
          f"{', '.join(str(int(x)) for x in tbl.peak_live)}")
    for k in ("params", "grads", "adam_moments", "activations", "ends_gathered", "borrowed"):
        print(f"  {k:<20}{p[k] / gib:>12.2f} GiB per device")
    print("  (params, grads and AdamW: each stage's resident slots, its share of the pooled blocks, and embedding, "
          "head and MTP split over 'stage' too; ends_gathered and borrowed: the ends and the pooled blocks brought "
          "whole for the step, with their gradient sums)")
    return {"pipeline_schedule": schedule, "pipeline_bubble": round(tbl.bubble, 6),
            "pipeline_imbalance": round(p["imbalance"], 6), "pipeline_ghost_params": p["ghost_params"],
            "pipeline_pooled_params": lay.pooled_params, "pipeline_borrowed_bytes_per_device": p["borrowed"],
            "pipeline_stage_layers": [len(lay.blocks(q)) for q in range(lay.stages)],
            "pipeline_param_bytes_per_device": p["params"], "pipeline_activation_bytes_per_device": p["activations"],
            "pipeline_ends_gathered_bytes_per_device": p["ends_gathered"]}
