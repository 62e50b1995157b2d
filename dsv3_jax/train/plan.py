"""Dry run: build the model abstractly (`nnx.eval_shape`, nothing allocated) and report its size.

Counts come from the real module tree (`dsv3_jax.model.param_counts`), not from a formula, so they
check the code as well as the config. For the released DeepSeek-V3 config this prints 671.0B main
parameters, 11.6B MTP parameters of its own (embedding and head are shared with the main model) and
~37.6B activated per token (routed experts counted K/E, embedding and head included).
"""
from __future__ import annotations

import json
import math

import jax.numpy as jnp
from flax import nnx

from dsv3_jax import param_kinds, sharding
from dsv3_jax.config import ModelConfig
from dsv3_jax.flops import attention_costs
from dsv3_jax.model import DeepSeekV3, abstract_model, param_counts
from dsv3_jax.parallel.pipeline.dry_run import print_pipeline_plan


def component_counts(model: DeepSeekV3) -> dict[str, int]:
    """Main-model parameters per component (`param_kinds.param_kind`): embedding, head, attention, dense FFN,
    routed and shared experts, router, norms."""
    out = dict.fromkeys(["embedding", "lm_head", "attention", "dense_ffn", "routed_experts", "shared_experts",
                         "router", "norms"], 0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if param_kinds.in_mtp(path):
            continue
        out[param_kinds.param_kind(path)] += math.prod(int(s) for s in var.get_value().shape)
    return out


def dry_run(cfg: ModelConfig, mesh_sizes: dict | None = None, batch_size: int = 1, seq_len: int = 1,
            remat: bool = False, microbatches: int = 1, grad_accum: int = 1, schedule: str = "gpipe", chunks: int = 1,
            stage_layers: str = "", trainable=None, lora_opts=None, hbm_bytes: int | None = None) -> dict:
    """Print the parameter table, the per-device memory plan (with `mesh_sizes`), the pipeline plan (with a
    'stage' axis > 1) and, as the final line, the counts (and the pipeline's figures) as JSON; `trainable` as the
    optimizer's (`train.loop.trainable_filter`) gives `trainable_params` of the `total_params`; with `lora_opts`
    (config.lora) and a mesh, the fine-tuning plan (`finetune_plan`, FP8 base), fitting `hbm_bytes` or not."""
    model = abstract_model(cfg)
    counts = param_counts(model)
    counted = model
    if lora_opts is not None:  # the adapters are part of the trained tree
        import dataclasses

        from dsv3_jax import runtime as runtime_lib

        counted = abstract_model(cfg, dataclasses.replace(runtime_lib.default(), lora=lora_opts))
    counts |= param_kinds.trainable_counts(nnx.to_pure_dict(nnx.state(counted, nnx.Param)), trainable)
    parts = component_counts(model)
    print(f"{'component':<28}{'parameters':>20}")
    for k, v in parts.items():
        print(f"{k:<28}{v:>20,}")
    print("-" * 48)
    rows = [("main model (total)", counts["params_total"]), ("MTP modules (own)", counts["params_mtp"]),
            ("activated per token", counts["params_active"])]
    for k, v in rows:
        print(f"{k:<28}{v:>20,}  ({v / 1e9:.1f}B)")
    if cfg.dsa:  # DeepSeek Sparse Attention: what the indexer saves per decoded token and layer (BF16 cache)
        print(f"sparse attention (index_topk {cfg.index_topk}), per token and layer, dense -> sparse:")
        for c in (4096, 16384, 65536, 131072):
            a = attention_costs(cfg, c)
            print(f"  context {c:>7,}: attention FLOPs {a['dense_attn_flops']:.3e} -> {a['sparse_attn_flops']:.3e}, "
                  f"cache bytes read {a['dense_cache_bytes_read']:,} -> {a['sparse_cache_bytes_read']:,}")
        counts["dsa_cache_bytes_per_token_layer"] = attention_costs(cfg, 1)["cache_bytes_per_token_sparse"]
    if mesh_sizes is not None:
        print_memory_plan(cfg, mesh_sizes, batch_size, seq_len, remat, microbatches, grad_accum)
        if lora_opts is not None:
            ft = finetune_plan(cfg, mesh_sizes, batch_size, seq_len, remat=remat, lora_opts=lora_opts,
                               grad_accum=grad_accum, hbm_bytes=hbm_bytes)
            print_finetune_plan(ft, mesh_sizes)
            counts |= ft
        if mesh_sizes["stage"] > 1:
            counts |= print_pipeline_plan(model, mesh_sizes, batch_size, seq_len, microbatches, schedule, chunks,
                                          stage_layers, remat)
    print(json.dumps(counts))
    return counts


# ----------------------------------------------------------------------------- memory plan



def memory_plan(cfg: ModelConfig, sizes: dict, batch_size: int, seq_len: int, *, remat: bool,
                moment_bytes: int = 4, grad_accum: int = 1) -> dict:
    """Per-device bytes of parameters, gradients, AdamW moments and (estimated) activations.

    Parameters and gradients are counted from the abstract module tree and the rules table (float32
    master weights; shards rounded up where an axis does not divide). Activations are an estimate per
    token and layer: with remat only each block's input [D] is kept plus one layer's working set,
    without it every layer keeps its working set (~ 24*D + 2*N*T_attn + 3*K*F values). With gradient
    accumulation only one of the `grad_accum` micro-batches is live at a time.
    """
    model = abstract_model(cfg)
    state = nnx.state(model, nnx.Param)
    specs = sharding.pure_specs(state)
    param_bytes = 0
    for path, var in nnx.to_flat_state(state):
        spec = specs
        for k in path:
            spec = spec[k]
        itemsize = jnp.dtype(var.get_value().dtype).itemsize
        param_bytes += sharding.shard_numel(var.get_value().shape, spec, sizes) * itemsize
    dp = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    tokens = -(-batch_size // dp) * seq_len
    layers = -(-cfg.num_dense_layers // sizes["stage"]) + -(-cfg.num_moe_layers // sizes["stage"])
    act_item = jnp.dtype(cfg.compute_dtype).itemsize
    working = (24 * cfg.hidden_size + 2 * cfg.num_attention_heads * seq_len
               + 3 * cfg.num_experts_per_tok * cfg.moe_intermediate_size) * act_item
    per_layer_saved = cfg.hidden_size * act_item if remat else working
    live = -(-batch_size // (dp * grad_accum)) * seq_len
    activations = live * (layers * per_layer_saved + (working if remat else 0))
    return {"params": param_bytes, "grads": param_bytes, "adam_moments": param_bytes // 4 * moment_bytes * 2,
            "activations_est": activations, "tokens_per_device": tokens, "layers_per_stage": layers,
            "live_tokens_per_device": live}


def print_memory_plan(cfg: ModelConfig, sizes: dict, batch_size: int, seq_len: int, remat: bool,
                      microbatches: int = 1, grad_accum: int = 1) -> dict:
    plan = memory_plan(cfg, sizes, batch_size, seq_len, remat=remat, grad_accum=grad_accum)
    gib = 1024 ** 3
    mesh = " x ".join(f"{a} {s}" for a, s in sizes.items() if s > 1) or "1 device"
    print(f"\nper-device memory plan: mesh {mesh} ({_prod(sizes.values())} devices), global batch {batch_size} x "
          f"{seq_len}, {plan['tokens_per_device']} tokens and {plan['layers_per_stage']} layers per device, "
          f"remat={remat}")
    total = 0
    for k in ("params", "grads", "adam_moments", "activations_est"):
        total += plan[k]
        print(f"  {k:<20}{plan[k] / gib:>12.2f} GiB")
    print(f"  {'total':<20}{total / gib:>12.2f} GiB")
    per_seq = plan["activations_est"] / max(plan["live_tokens_per_device"] // seq_len, 1)
    print(f"  (activations per sequence of {seq_len} tokens: {per_seq / gib:.2f} GiB; "
          f"{plan['live_tokens_per_device'] // seq_len} sequences live at once per device with "
          f"train.grad_accum_steps={grad_accum}; within one, a GPipe pipeline keeps every micro-batch's activations "
          f"until the backward)")
    return plan


def finetune_plan(cfg: ModelConfig, sizes: dict, batch_size: int, seq_len: int, *, remat: bool, lora_opts,
                  fp8_base: bool = True, grad_accum: int = 1, hbm_bytes: int | None = None) -> dict:
    """Per-device bytes of fine-tuning `cfg` on `sizes`: in full (float32 masters, gradients and AdamW moments, the
    `memory_plan`) and with LoRA adapters (`lora_opts`) on a frozen base held as shipped (FP8 blocks plus scales
    with `fp8_base`, else BF16: `infer.memory_plan.weight_bytes`), where only the adapters have float32 gradients and
    moments. Activations are `memory_plan`'s estimate for both. `hbm_bytes`: whether each fits."""
    import dataclasses

    from dsv3_jax import lora
    from dsv3_jax import runtime as runtime_lib
    from dsv3_jax.infer.memory_plan import weight_bytes

    full = memory_plan(cfg, sizes, batch_size, seq_len, remat=remat, grad_accum=grad_accum)
    rt = dataclasses.replace(runtime_lib.default(), lora=lora_opts)
    model = nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0), runtime=rt))
    state = nnx.state(model, nnx.Param)
    specs = sharding.pure_specs(state)
    adapters = adapter_params = 0
    for path, var in nnx.to_flat_state(state):
        if not lora.is_adapter(path):
            continue
        spec = specs
        for k in path:
            spec = spec[k]
        shape = var.get_value().shape
        adapters += sharding.shard_numel(shape, spec, sizes) * 4  # float32 adapters
        adapter_params += math.prod(int(d) for d in shape)
    base = weight_bytes(cfg, sizes, (128, 128) if fp8_base else None)["fp8" if fp8_base else "bf16"]
    lora_total = base + adapters * 4 + full["activations_est"]  # adapters, their gradients and two moments
    full_total = full["params"] + full["grads"] + full["adam_moments"] + full["activations_est"]
    out = {"full_finetune_bytes_per_device": full_total, "lora_bytes_per_device": lora_total,
           "lora_base_bytes_per_device": base, "lora_adapter_bytes_per_device": adapters * 4,
           "activations_est_bytes_per_device": full["activations_est"], "lora_rank": lora_opts.rank,
           "lora_trainable_params": adapter_params, "lora_fp8_base": fp8_base}
    if hbm_bytes:
        out |= {"hbm_bytes": hbm_bytes, "full_finetune_fits": full_total <= hbm_bytes,
                "lora_fits": lora_total <= hbm_bytes}
    return out


def print_finetune_plan(plan: dict, sizes: dict) -> None:
    gib = 1024 ** 3
    mesh = " x ".join(f"{a} {s}" for a, s in sizes.items() if s > 1) or "1 device"
    fits = lambda k: "" if "hbm_bytes" not in plan else ("  fits" if plan[k] else "  does not fit")  # noqa: E731
    base = "FP8 as shipped" if plan["lora_fp8_base"] else "BF16"
    each = f", {plan['hbm_bytes'] / gib:.0f} GiB each" if "hbm_bytes" in plan else ""
    print(f"\nfine-tuning memory per device, mesh {mesh}{each}:")
    print(f"  {'full (f32 masters, grads, AdamW)':<44}{plan['full_finetune_bytes_per_device'] / gib:>10.1f} GiB"
          f"{fits('full_finetune_fits')}")
    name = f"LoRA rank {plan['lora_rank']}, base {base}"
    print(f"  {name:<44}{plan['lora_bytes_per_device'] / gib:>10.1f} GiB{fits('lora_fits')}")
    print(f"    base weights {plan['lora_base_bytes_per_device'] / gib:.1f} GiB, adapters with grads and moments "
          f"{plan['lora_adapter_bytes_per_device'] / gib:.2f} GiB ({plan['lora_trainable_params']:,} trainable), "
          f"activations (est.) {plan['activations_est_bytes_per_device'] / gib:.1f} GiB")


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def dry_run_mesh(config) -> dict:
    """Mesh sizes for a dry run: explicit sizes need not match this machine's devices (a plan for 2,048
    GPUs can be printed on a laptop); an axis of -1 is filled from the local device count."""
    import jax

    mesh_cfg = {k: v for k, v in config.mesh.to_dict().items() if k not in sharding.MESH_OPTIONS}
    if any(v == -1 for v in mesh_cfg.values()):
        return sharding.mesh_sizes(mesh_cfg, jax.device_count())
    return sharding.mesh_sizes(mesh_cfg, _prod(mesh_cfg.values()))
