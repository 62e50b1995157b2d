"""Peak memory of the streaming HF -> orbax converter, against model size.

    python benchmarks/convert_memory.py [--layers 4] [--fp8 [--keep_fp8]] [--workdir /tmp/convert_bench]

Writes two synthetic released-format checkpoints (random BF16 weights, or FP8 with 128x128 scales
with --fp8; same widths, `--layers` and 2x`--layers` layers, one MTP layer, sharded files with an
index), then converts each in a fresh process with `python -m dsv3_jax.interop.convert` and reads
that process's peak resident set size (ru_maxrss from wait4). For contrast, the same checkpoints are
loaded onto the device with `hf.load` (a fresh process each; on CPU the "device" is host memory too, so its
peak counts the loaded model once plus what loading holds on the side: one layer slice of one parameter).
The converter's peak should stay flat (imports + a few tensors) while the checkpoint doubles; `hf.load`'s
grows by the model it returns. --keep_fp8 converts and loads with the FP8 weights kept FP8.
The synthetic checkpoints are generated tensor by tensor too (layout.plan + safetensors_io.write_shards).
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8 import quant as fp8_quant
from dsv3_jax.interop import hf
from dsv3_jax.interop import layout as L
from dsv3_jax.interop import safetensors_io as st


def bench_config(layers: int) -> ModelConfig:
    return ModelConfig(vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                       num_hidden_layers=layers, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256,
                       qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
                       num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                       num_nextn_predict_layers=1, max_position_embeddings=4096, rope_scaling=None)


def write_synthetic(cfg: ModelConfig, directory: str, fp8: bool) -> tuple[int, int]:
    """Random released-format checkpoint; returns (bytes on disk, largest tensor bytes)."""
    _, params, biases = L.abstract_states(cfg)
    plan = L.plan(cfg, L.Format(mtp_layers=cfg.num_nextn_predict_layers), L.model_leaves(params, biases))
    bf16 = np.dtype(st.DTYPES["BF16"])
    planned = []

    def rand(shape, seed):
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.02

    keys = list(dict.fromkeys(p.key for p in plan.pieces)) + [a.key for a in plan.aliases]
    source = {a.key: a.source for a in plan.aliases}
    seeds = {k: i for i, k in enumerate(keys)}
    for key in keys:
        shape, seed = plan.expected[key], seeds[source.get(key, key)]
        if key.endswith("e_score_correction_bias"):
            planned.append(st.PlannedTensor(key, shape, np.dtype(np.float32), lambda s=shape, n=seed: rand(s, n)))
        elif fp8 and key in plan.quantizable:
            sshape = (-(-shape[0] // 128), -(-shape[1] // 128))
            planned.append(st.PlannedTensor(key, shape, np.dtype(st.DTYPES["F8_E4M3"]),
                                            lambda s=shape, n=seed:
                                            np.asarray(fp8_quant.quantize_blocks(rand(s, n))[0])[:s[0], :s[1]]))
            planned.append(st.PlannedTensor(key + st.SCALE_SUFFIX, sshape, np.dtype(np.float32),
                                            lambda s=shape, n=seed:
                                            np.asarray(fp8_quant.quantize_blocks(rand(s, n))[1])))
        else:
            planned.append(st.PlannedTensor(key, shape, bf16, lambda s=shape, n=seed: rand(s, n).astype(bf16)))
    os.makedirs(directory, exist_ok=True)
    st.write_shards(directory, planned, max_shard_bytes=256 * 2**20)
    with open(os.path.join(directory, hf.CONFIG_FILE), "w") as f:
        json.dump(hf.config_to_hf(cfg, torch_dtype="bfloat16", fp8_block=(128, 128) if fp8 else None), f)
    sizes = [math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in planned]
    return sum(sizes), max(sizes)


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4, help="layers of the smaller model (the larger has twice)")
    p.add_argument("--fp8", action="store_true", help="FP8 weights with 128x128 scales (dequantised on convert)")
    p.add_argument("--keep_fp8", action="store_true", help="convert and load them kept FP8 (FP8-resident)")
    p.add_argument("--workdir", default="/tmp/convert_bench")
    p.add_argument("--no-load", action="store_true", help="skip the in-memory hf.load contrast")
    p.add_argument("--max_chunk_mib", type=int, default=64, help="converter: larger tensors stream in row bands")
    args = p.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    py = sys.executable
    baseline, _ = peak_rss([py, "-c", "import dsv3_jax.interop.convert, jax.numpy as jnp; jnp.zeros(1)"])
    rows = []
    for layers in (args.layers, 2 * args.layers):
        src = os.path.join(args.workdir, f"hf_{layers}")
        size, largest = write_synthetic(bench_config(layers), src, args.fp8)
        rss, sec = peak_rss([py, "-m", "dsv3_jax.interop.convert", "--hf", src, "--out",
                             os.path.join(args.workdir, f"out_{layers}"), "--dtype", "bfloat16",
                             "--max_chunk_mib", str(args.max_chunk_mib)] + (["--keep_fp8"] if args.keep_fp8 else []))
        load_rss = float("nan")
        if not args.no_load:
            load_rss, _ = peak_rss([py, "-c", f"import jax.numpy as jnp; from dsv3_jax.interop import hf; "
                                              f"hf.load({src!r}, dtype=jnp.bfloat16, keep_fp8={args.keep_fp8})"])
        rows.append((layers, size / 2**20, largest / 2**20, rss, rss - baseline, sec, load_rss))
    fmt = "{:>6} {:>14} {:>14} {:>16} {:>18} {:>9} {:>18}"
    kind = ("FP8, kept FP8" if args.keep_fp8 else "FP8") if args.fp8 else "BF16"
    print(f"imports-only process peak RSS: {baseline:.0f} MiB ({kind} checkpoints, "
          f"row bands above {args.max_chunk_mib} MiB)")
    print(fmt.format("layers", "ckpt MiB", "largest MiB", "convert peak MiB", "convert - imports", "seconds",
                     "hf.load peak MiB"))
    for r in rows:
        print(fmt.format(r[0], f"{r[1]:.0f}", f"{r[2]:.0f}", f"{r[3]:.0f}", f"{r[4]:.0f}", f"{r[5]:.1f}",
                         f"{r[6]:.0f}"))
    (l1, s1, *_), (l2, s2, *_) = rows
    print(f"checkpoint x{s2 / s1:.2f}: converter peak RSS x{rows[1][3] / rows[0][3]:.2f}"
          + ("" if args.no_load else f", hf.load peak RSS x{rows[1][6] / rows[0][6]:.2f}"))


if __name__ == "__main__":
    main()
