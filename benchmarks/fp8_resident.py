"""FP8-resident weights: memory, accuracy and decode speed of a checkpoint kept FP8 against the same checkpoint
dequantised, in one process.

    python benchmarks/fp8_resident.py [--workdir workdir/demo] [--new_tokens 64] [--repeats 3] [--json FILE]
    python benchmarks/fp8_resident.py --random_init     # configs/tiny.py's model from --seed: no training first

The demo model (`python train.py`, trained here first if --workdir has no checkpoint) is written with
`hf.save(fp8=True)` (128x128 E4M3 blocks + scales, as the release stores them) and loaded from that directory
four ways: dequantised in float32 (the reference) and in bfloat16, and kept FP8 (`hf.load(keep_fp8=True)`)
with W8A8 and with weight-only GEMMs (float32 compute, as on CPU).

  memory    device bytes of the loaded model state (params + router biases); 'rest BF16' is the FP8-kept model
            with every non-FP8 tensor in BF16 (as served), and 'vs BF16' compares that with the BF16 model
  accuracy  on the 16 prompts of benchmarks/decode.py (teacher-forced forward over each prompt + the
            reference's greedy continuation): max |logit diff| / max |logit| against the float32 reference
            (over all positions, and the median over positions of each position's max), how often the
            argmax agrees with the reference's at those positions;
            and greedy decoding of --new_tokens per prompt: how many leading tokens agree with the reference
            (first divergence), and how many positions agree in all
  speed     decode tokens/s, batch 1, greedy, --new_tokens per prompt over the first four prompts, best of
            --repeats (compilation excluded); ratios against the dequantised float32 model in this run.

On CPU the FP8 GEMMs run as jnp (`gemm.py`'s 'blocked' formulation: a dot of fp8 blocks per 128-wide K block
and an f32 sum), not as a fused kernel, so kept-FP8 decode is expected to be slower there; the point of FP8
residency is memory (and, on Hopper, the FP8 tensor cores). Absolute speed counts only on an accelerator.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (puts the repository root on sys.path)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from decode import PROMPTS, ensure_demo, random_model  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax.infer.engine import Engine  # noqa: E402
from dsv3_jax.infer.memory_plan import device_bytes  # noqa: E402
from dsv3_jax.infer.sampling import SamplingParams  # noqa: E402
from dsv3_jax.interop import hf  # noqa: E402

GREEDY = SamplingParams(0.0, 0, 1.0, 0)


def load_variants(path: str) -> dict:
    return {"dequantised f32": hf.load(path, dtype=jnp.float32)[1],
            "dequantised bf16": hf.load(path, dtype=jnp.bfloat16)[1],
            "FP8 W8A8": hf.load(path, dtype=jnp.float32, keep_fp8=True, fp8_mode="w8a8")[1],
            "FP8 weight-only": hf.load(path, dtype=jnp.float32, keep_fp8=True, fp8_mode="weight_only")[1]}


def leading_agreement(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=os.path.join(C.ROOT, "workdir", "demo"))
    p.add_argument("--train_steps", type=int, default=300, help="steps when the demo model must be trained first")
    p.add_argument("--random_init", action="store_true", help="configs/tiny.py's model from --seed, random prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)

    if args.random_init:
        model, ids = random_model(None, args.seed)
        source = f"random init (configs/tiny.py, seed {args.seed})"
    else:
        ensure_demo(args.workdir, args.train_steps)
        from dsv3_jax.infer.load import load_trained

        model, tokenizer, _, step = load_trained(args.workdir)
        ids = [tokenizer.encode(t).ids for t in PROMPTS]
        source = f"demo model {args.workdir} step {step}"
    with tempfile.TemporaryDirectory() as d:
        hf.save(model, None, d, fp8=True)
        models = load_variants(d)
        # Memory as served: everything that is not FP8 in BF16, against the whole model in BF16.
        kept_bf16 = device_bytes(nnx.state(hf.load(d, dtype=jnp.bfloat16, keep_fp8=True)[1]))
    ref_name = "dequantised f32"
    seq_len = max(map(len, ids)) + args.new_tokens

    greedy = {}
    for name, m in models.items():
        eng = Engine.for_batch(m, len(ids), seq_len)
        greedy[name] = [c.tokens for c in eng.generate(ids, args.new_tokens, GREEDY, stop_tokens=())]
    # Teacher-forced logits over prompt + the reference's continuation, one row per prompt (padded at the end).
    seqs = [p + g for p, g in zip(ids, greedy[ref_name])]
    T = max(map(len, seqs))
    toks = jnp.asarray([s + [0] * (T - len(s)) for s in seqs])
    valid = np.asarray([[t < len(s) for t in range(T)] for s in seqs])
    logits = {name: np.asarray(m(toks).logits, np.float32)[valid] for name, m in models.items()}
    ref = logits[ref_name]

    rows = []
    for name, m in models.items():
        eng = Engine.for_batch(m, 1, seq_len)
        best = 0.0
        for _ in range(args.repeats):  # Completion.seconds: wall time less compilation
            out = [eng.generate([p], args.new_tokens, GREEDY, stop_tokens=())[0] for p in ids[:4]]
            best = max(best, sum(len(c.tokens) for c in out) / sum(c.seconds for c in out))
        lead = [leading_agreement(a, b) for a, b in zip(greedy[name], greedy[ref_name])]
        same = [sum(x == y for x, y in zip(a, b)) for a, b in zip(greedy[name], greedy[ref_name])]
        served = kept_bf16 if name.startswith("FP8") else device_bytes(nnx.state(m))
        per_pos = np.abs(logits[name] - ref).max(-1) / np.abs(ref).max()
        rows.append({"model": name, "bytes": device_bytes(nnx.state(m)), "bytes_rest_bf16": served,
                     "rel_logit_err": float(per_pos.max()), "rel_logit_err_median": float(np.median(per_pos)),
                     "argmax_agree": float((logits[name].argmax(-1) == ref.argmax(-1)).mean()),
                     "greedy_leading_agree_min": min(lead), "greedy_leading_agree_mean": float(np.mean(lead)),
                     "greedy_positions_agree": sum(same), "greedy_positions": sum(map(len, greedy[ref_name])),
                     "decode_tokens_per_sec": best})
    base = {r["model"]: r for r in rows}
    print(f"{source}; {len(ids)} prompts, {args.new_tokens} greedy tokens each; saved with hf.save(fp8=True)")
    print(f"{'weights':<18}{'device MiB':>11}{'rest BF16':>10}{'vs BF16':>9}{'max|dlogit|/max|logit|':>24}"
          f"{'(median pos.)':>14}{'argmax agree':>13}{'leading agree (min/mean)':>26}{'positions agree':>17}"
          f"{'decode tok/s':>14}{'vs f32':>8}")
    for r in rows:
        lead = f"{r['greedy_leading_agree_min']} / {r['greedy_leading_agree_mean']:.1f}"
        pos = f"{r['greedy_positions_agree']} / {r['greedy_positions']}"
        print(f"{r['model']:<18}{r['bytes'] / 2**20:>11.2f}{r['bytes_rest_bf16'] / 2**20:>10.2f}"
              f"{r['bytes_rest_bf16'] / base['dequantised bf16']['bytes']:>9.2f}"
              f"{r['rel_logit_err']:>24.2e}{r['rel_logit_err_median']:>14.2e}{r['argmax_agree']:>13.1%}"
              f"{lead:>26}{pos:>17}{r['decode_tokens_per_sec']:>14.1f}"
              f"{r['decode_tokens_per_sec'] / base[ref_name]['decode_tokens_per_sec']:>8.2f}")
    out = {"source": source, "new_tokens": args.new_tokens, "prompts": len(ids), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
