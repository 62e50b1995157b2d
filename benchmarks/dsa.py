"""DeepSeek Sparse Attention (V3.2) against dense MLA, one attention layer, in the same run: prefill (the training
path's forward over T tokens) and one decode step (one query over a cache of T positions) at T = 4K / 16K / 64K,
on a small config with index_topk scaled down so that sparsity bites; then the FLOPs and cache bytes per token of
both at DeepSeek-V3.2's sizes (2,048 of the context, 64 indexer heads of 128).

    python benchmarks/dsa.py [--contexts 4096,16384,65536] [--topk 256] [--json out.jsonl]

Both prefills run blockwise (Runtime.attention='blockwise': flash attention for dense, `dsa.sparse_latent_attention`
for sparse), so neither holds a [T, T] array; decode reads a dense latent cache (absorbed MLA). Times are the
median of 3 after a compile (1 where a call takes over 20 s); the load average before and after is printed so a
noisy run is visible. On this CPU the indexer's scoring is itself quadratic (it is DSA's cheap O(T^2) part: FP8
and few heads on accelerators), so the CPU ratio understates what the FLOP counts below say.
"""
from __future__ import annotations

import _common as C  # (puts the repository root on sys.path)

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import runtime
from dsv3_jax.config import ModelConfig
from dsv3_jax.flops import attention_costs
from dsv3_jax.mla import MLA, LatentCache
from dsv3_jax.rope import rope_tables

SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1, first_k_dense_replace=1,
             num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
             v_head_dim=32, num_nextn_predict_layers=0, index_n_heads=4, index_head_dim=32, rope_scaling=None,
             dtype="float32", max_position_embeddings=1 << 17)


def layer(cfg: ModelConfig, block: int):
    rt = dataclasses.replace(runtime.resolve(attention="blockwise"), attention_block=block)
    return MLA(cfg, rngs=nnx.Rngs(0), runtime=rt)


def measure(T: int, topk: int, block: int) -> dict:
    out = {"context": T}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, T, SMALL["hidden_size"])), jnp.float32)
    for name, k in (("dense", 0), ("sparse", topk)):
        cfg = ModelConfig(**SMALL, index_topk=k)
        m = layer(cfg, block)
        gd, st = nnx.split(m)
        pos = jnp.arange(T)[None]
        cos, sin = rope_tables(cfg, pos)
        prefill = jax.jit(lambda st, x, cos, sin, gd=gd: nnx.merge(gd, st).prefill(x, cos, sin))
        out[f"{name}_prefill_s"] = C.timed(prefill, st, x, cos, sin, long_s=20)  # (64K prefill on CPU: one run)
        _, c_kv, k_pe = prefill(st, x, cos, sin)
        cache = LatentCache.zeros(cfg, 1, T, jnp.float32).fill(c_kv, k_pe)
        q = x[:, -1:]
        qpos = jnp.full((1, 1), T - 1)
        qcos, qsin = rope_tables(cfg, qpos)
        decode = jax.jit(lambda st, q, c, s, cache, p, gd=gd: nnx.merge(gd, st).decode(q, c, s, cache, p)[0])
        out[f"{name}_decode_ms"] = 1e3 * C.timed(decode, st, q, qcos, qsin, cache, qpos, long_s=20)
    out["prefill_speedup"] = out["dense_prefill_s"] / out["sparse_prefill_s"]
    out["decode_speedup"] = out["dense_decode_ms"] / out["sparse_decode_ms"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="4096,16384,65536")
    ap.add_argument("--topk", type=int, default=256)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    load = C.LoadWatch()
    rows = [measure(int(t), a.topk, a.block) for t in a.contexts.split(",")]
    print(f"one MLA layer, small config (hidden {SMALL['hidden_size']}, {SMALL['num_attention_heads']} heads, "
          f"indexer {SMALL['index_n_heads']} x {SMALL['index_head_dim']}, index_topk {a.topk}), jax "
          f"{jax.__version__} on {jax.devices()[0].platform}; {load.line()}")
    print(f"{'context':>8} {'dense prefill':>14} {'sparse prefill':>15} {'x':>6} {'dense decode':>13} "
          f"{'sparse decode':>14} {'x':>6}")
    for r in rows:
        print(f"{r['context']:>8} {r['dense_prefill_s']:>12.3f} s {r['sparse_prefill_s']:>13.3f} s "
              f"{r['prefill_speedup']:>6.2f} {r['dense_decode_ms']:>10.2f} ms {r['sparse_decode_ms']:>11.2f} ms "
              f"{r['decode_speedup']:>6.2f}")
    v32 = ModelConfig(index_topk=2048)
    print("\nDeepSeek-V3.2 sizes, per token and layer (decode at that context):")
    print(f"{'context':>8} {'dense FLOPs':>12} {'sparse FLOPs':>13} {'x':>6} {'dense bytes':>12} {'sparse bytes':>13}"
          f" {'x':>6}")
    v32_rows = [attention_costs(v32, c) for c in (4096, 16384, 65536, 131072)]
    for r in v32_rows:
        print(f"{r['context']:>8} {r['dense_attn_flops']:>12.3e} {r['sparse_attn_flops']:>13.3e} "
              f"{r['flops_ratio']:>6.2f} {r['dense_cache_bytes_read']:>12,} {r['sparse_cache_bytes_read']:>13,} "
              f"{r['bytes_ratio']:>6.2f}")
    print(f"cache bytes per token and layer (BF16): dense {v32_rows[0]['cache_bytes_per_token_dense']}, sparse "
          f"{v32_rows[0]['cache_bytes_per_token_sparse']} (the indexer's key beside the latent)")
    record = {"bench": "dsa", "cpu": rows, "v32": v32_rows, "load": [load.before, load.after], "jax": jax.__version__}
    print(json.dumps(record))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
