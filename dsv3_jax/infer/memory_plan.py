"""Serving memory plan: per-device weight bytes of a released checkpoint kept in FP8 as shipped (or in BF16),
what is left of the device memory for the latent cache, and how many cached tokens that holds.

    python infer.py --hf DIR --keep_fp8 --dry_run --mesh expert=8 [--hbm_gib 141]    (DIR may hold only config.json)

Counted from the abstract model (nothing is allocated) exactly as `hf.load` builds it, per device of the
mesh, each dim divided (rounded up) by the mesh axes it is sharded over (`sharding.shard_numel`):
  * kept FP8 (`hf.load(keep_fp8=True)`, dsv3_jax/fp8/resident.py): every projection and expert weight
    costs 1 byte per element plus its float32 128x128 block scales (sharded along their stacked
    layer/expert axes, replicated along the block axes); everything else (embedding, head, norms,
    router, eh_proj) costs 2 bytes (BF16), the router bias 4 (float32);
  * the BF16 comparison costs every parameter 2 bytes (the router bias 4).
tests/test_memory_plan.py checks the FP8 figure against the bytes a loaded model holds on each device.
The latent cache holds kv_lora_rank + qk_rope_head_dim values per token per layer (576 at V3 sizes; V3.2 adds the
indexer's key, index_head_dim values, or E4M3 plus a float32 scale with `index_fp8`: `paged_cache.bytes_per_token`)
for the main layers (plus the MTP layer's own when speculating, not counted here), in the cache dtype; it is split
over the batch axes only, so every device of a batch shard holds the whole cache of its sequences:
cache_tokens_per_device = (HBM - weights - reserve) / bytes per token.
`cache_bytes_per_token` measures that figure from a cache's arrays; `mha_cache_bytes_per_token` is what a plain
multi-head K/V cache of the same model would take (notebook 02, benchmarks/decode.py).
"""
from __future__ import annotations

import json
import math

import jax
import numpy as np
from jax.sharding import PartitionSpec

from dsv3_jax import runtime as runtime_lib
from dsv3_jax import sharding
from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.paged_cache import bytes_per_token
from dsv3_jax.interop import layout as L

GIB = 1024**3


def weight_bytes(cfg: ModelConfig, sizes: dict, fp8_block: tuple[int, int] | None) -> dict:
    """{'fp8': bytes per device with FP8-resident projections and experts, 'bf16': bytes per device in BF16,
    'fp8_params': elements stored in FP8, 'params': all elements} (main model and MTP modules)."""
    if fp8_block is not None and tuple(fp8_block) != (128, 128):
        raise UserError(f"weight_block_size={list(fp8_block)}: FP8-resident weights use 128x128 blocks")
    cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    out = {"fp8": 0, "bf16": 0, "fp8_params": 0, "params": 0}
    for kind, rt in (("bf16", None), ("fp8", runtime_lib.default().with_fp8_weights("w8a8"))):
        _, params, biases = L.abstract_states(cfg, rt)
        specs = L.leaf_specs(params, biases)
        leaves = L.model_leaves(params, biases)
        scales = {L.scale_leaf(p) for p, sds in leaves.items() if L.is_fp8_leaf(sds)}
        for path, sds in leaves.items():
            n = sharding.shard_numel(sds.shape, specs.get(path, PartitionSpec()), sizes)
            itemsize = 4 if path[0] == "biases" else np.dtype(sds.dtype).itemsize
            out[kind] += n * itemsize
            if kind == "bf16":
                out["params"] += math.prod(sds.shape)
            elif L.is_fp8_leaf(sds):
                out["fp8_params"] += math.prod(sds.shape)
            assert kind == "bf16" or path not in scales or sds.dtype == np.float32
    return out


def device_bytes(state) -> int:
    """Bytes a placed model state (any pytree of jax Arrays) holds on its most loaded device: the measured
    counterpart of `weight_bytes`."""
    per: dict = {}
    for a in jax.tree.leaves(state):
        for shard in a.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return max(per.values(), default=0)


def cache_bytes_per_token(cache) -> dict:
    """Bytes each token occupies in a latent cache, measured from its arrays' shapes (works on abstract ones):
    {'main': all main-model layers, 'mtp': the MTP layer}. `cache` is a `ModelCache` of contiguous
    (`mla.LatentCache`, [L, B, S, *]) or paged (`paged_cache.PagedLatentCache`, [L, P, G, *]) caches: either
    way the two axes before the last are the token slots of one layer."""

    def per_token(c):
        if c is None:
            return 0
        arrays = [a for a in (c.c_kv, c.k_pe, getattr(c, "k_idx", None), getattr(c, "k_idx_scale", None))
                  if a is not None]
        return sum(a.dtype.itemsize * a.size // (a.shape[-2] * a.shape[-3]) for a in arrays)

    return {"main": per_token(cache.dense) + per_token(cache.moe), "mtp": per_token(cache.mtp)}


def mha_cache_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """A plain multi-head K/V cache of the same model: N (dn + dr) keys + N dv values per token per layer."""
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return per_layer * cfg.num_hidden_layers * itemsize


def serving_plan(cfg: ModelConfig, sizes: dict, *, fp8_block: tuple[int, int] | None, keep_fp8: bool,
                 hbm_bytes: int, cache_itemsize: int = 2, reserve_fraction: float = 0.05,
                 index_fp8: bool = False) -> dict:
    """The plan as a dict (see the module docstring); `reserve_fraction` of the memory is left for activations
    and the runtime."""
    w = weight_bytes(cfg, sizes, fp8_block if keep_fp8 else None)
    used = w["fp8"] if keep_fp8 else w["bf16"]
    per_token = bytes_per_token(cfg, cache_itemsize, index_fp8=index_fp8)  # (with a V3.2 indexer's keys)
    reserve = hbm_bytes - int(hbm_bytes * (1 - reserve_fraction))
    free = hbm_bytes - reserve - used
    return {"weights_bytes_per_device": used, "weights_bytes_per_device_bf16": w["bf16"],
            "weights_bytes_per_device_fp8": w["fp8"], "fp8_fraction_of_params": w["fp8_params"] / w["params"],
            "params": w["params"], "hbm_bytes": hbm_bytes, "reserve_bytes": reserve,
            "cache_bytes_per_device": max(free, 0), "cache_bytes_per_token": per_token,
            "cache_tokens_per_device": max(free, 0) // per_token, "fits": free > 0, "keep_fp8": keep_fp8,
            "devices": math.prod(sizes.values())}


def print_plan(plan: dict, sizes: dict) -> None:
    mesh = " x ".join(f"{a} {s}" for a, s in sizes.items() if s > 1) or "1 device"
    print(f"serving memory plan per device: mesh {mesh} ({plan['devices']} devices), {plan['hbm_bytes'] / GIB:.0f} GiB "
          f"each; {plan['params'] / 1e9:.1f}B parameters, {plan['fp8_fraction_of_params']:.1%} of them stored in FP8")
    rows = [("weights, FP8 as shipped + scales", plan["weights_bytes_per_device_fp8"]),
            ("weights, all BF16 (dequantised)", plan["weights_bytes_per_device_bf16"]),
            ("reserve (activations, runtime)", plan["reserve_bytes"]),
            (f"left for the latent cache ({'FP8' if plan['keep_fp8'] else 'BF16'} weights)",
             plan["cache_bytes_per_device"])]
    for name, v in rows:
        print(f"  {name:<44}{v / GIB:>10.1f} GiB")
    print(f"  {'latent cache per token (all layers)':<44}{plan['cache_bytes_per_token']:>10,} bytes")
    print(f"  {'cached tokens per device':<44}{plan['cache_tokens_per_device']:>10,}"
          + ("" if plan["fits"] else "   (the weights do not fit: add devices to the mesh)"))
    keys = ("weights_bytes_per_device", "weights_bytes_per_device_bf16", "cache_tokens_per_device")
    print(json.dumps({k: plan[k] for k in keys}))
