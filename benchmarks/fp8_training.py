"""FP8 vs high-precision training of the tiny config from the same seed(s): loss curves and their gaps.

    python benchmarks/fp8_training.py [--steps 100] [--config configs/tiny.py] [--log-every 10]
                                      [--seeds 1] [--json FILE]

For each seed s in 0..N-1 (`--seeds N`, default 1) runs `dsv3_jax.train.loop.train` twice in fresh
work directories, identical except for `config.model.fp8` (False, then True): `config.train.seed = s`,
so both runs share the data order, the train/validation split and the initial weights. All runs use
one tokenizer (the first run's), so token ids are identical across runs and seeds. On CPU the
high-precision run computes in float32 (the tiny config's dtype; XLA:CPU bf16 matmuls are slower and
no more informative); on an accelerator pass `--dtype bfloat16` for a BF16 baseline.

With one seed it prints the two curves, the relative difference per logged step, and the final and
tail-mean relative gaps. With several it prints a per-seed table (final train loss and final
validation loss, baseline / fp8 / relative gap) and, over seeds, the mean, sample standard deviation
and min..max of both gaps. `--json FILE` writes all of these numbers (curves included). Relative gap
= (fp8 - baseline) / baseline. DeepSeek reports < 0.25% relative loss error against BF16 for 16B and
230B models (REFERENCE.md section 6); a 7M-parameter model trained for a few hundred steps is a smoke
test of the same recipe, not a replica.
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import numpy as np

from dsv3_jax.train.loop import train


def load_config(path):
    spec = importlib.util.spec_from_file_location("fp8_bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def run(config_path, fp8, seed, args, workdir, tokenizer_path):
    c = load_config(config_path)
    c.train.steps = args.steps
    c.train.log_every = args.log_every
    c.train.eval_every = args.steps  # one validation loss, at the end
    c.train.sample_tokens = 0
    c.train.seed = seed
    c.checkpoint.every_steps = args.steps
    c.checkpoint.async_save = False
    if args.dtype:
        c.model.dtype = args.dtype
    if tokenizer_path:
        c.data.tokenizer_path = tokenizer_path  # the first run's tokenizer: identical token ids
    c.model.fp8 = fp8
    t0 = time.perf_counter()
    result = train(c, workdir, quiet=True)
    return result.history, time.perf_counter() - t0


def rel_gap(fp8, base):
    return (fp8 - base) / base


def compare(seed, base, fp8, t_base, t_fp8):
    """One seed's numbers: the curves, the final and tail-mean gaps, the final validation losses."""
    lb = np.array([r["loss"] for r in base])
    l8 = np.array([r["loss"] for r in fp8])
    rel = rel_gap(l8, lb)
    tail = max(1, len(rel) // 5)
    vb, v8 = base[-1].get("val_loss"), fp8[-1].get("val_loss")
    return {
        "seed": seed,
        "seconds": {"baseline": t_base, "fp8": t_fp8},
        "curve": [{"step": rb["step"], "baseline": float(b), "fp8": float(e), "rel_gap": float(d)}
                  for rb, b, e, d in zip(base, lb, l8, rel)],
        "final_loss": {"baseline": float(lb[-1]), "fp8": float(l8[-1]), "rel_gap": float(rel[-1])},
        "tail_records": tail,
        "tail_mean_abs_gap": float(np.abs(rel[-tail:]).mean()),
        "val_loss": (None if vb is None or v8 is None else
                     {"baseline": vb, "fp8": v8, "rel_gap": rel_gap(v8, vb)}),
    }


def spread(values):
    """Mean, sample standard deviation (None for a single value), min and max."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return None
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max())}


def print_single(r, args):
    """The one-seed report: both curves and the per-step gap."""
    name = args.dtype or "config dtype"
    print(f"tiny config, {args.steps} steps, same seed; baseline ({name}) {r['seconds']['baseline']:.0f} s, "
          f"fp8 {r['seconds']['fp8']:.0f} s")
    print(f"{'step':>6} {'baseline':>10} {'fp8':>10} {'rel diff':>9}")
    for p in r["curve"]:
        print(f"{p['step']:>6} {p['baseline']:>10.4f} {p['fp8']:>10.4f} {p['rel_gap']:>+9.2%}")
    f = r["final_loss"]
    print(f"final loss: baseline {f['baseline']:.4f}, fp8 {f['fp8']:.4f}, relative gap {f['rel_gap']:+.3%}; "
          f"mean |gap| over the last {r['tail_records']} records {r['tail_mean_abs_gap']:.3%} (DeepSeek: < 0.25%)")
    if r["val_loss"]:
        v = r["val_loss"]
        print(f"validation loss: baseline {v['baseline']:.4f}, fp8 {v['fp8']:.4f}, relative gap {v['rel_gap']:+.3%}")


def print_seeds(results, summary, args):
    """The several-seed report: one row per seed, then the gaps' spread over seeds."""
    name = args.dtype or "config dtype"
    total = sum(r["seconds"]["baseline"] + r["seconds"]["fp8"] for r in results)
    print(f"tiny config, {args.steps} steps, {len(results)} seeds; baseline ({name}) vs fp8, {total:.0f} s in all")
    print(f"{'seed':>4} | {'loss base':>9} {'fp8':>8} {'gap':>8} | {'val base':>9} {'fp8':>8} {'gap':>8}"
          f" | {'time base':>9} {'fp8':>6}")
    for r in results:
        f, v = r["final_loss"], r["val_loss"]
        val = (f"{v['baseline']:>9.4f} {v['fp8']:>8.4f} {v['rel_gap']:>+8.3%}" if v else f"{'-':>9} {'-':>8} {'-':>8}")
        print(f"{r['seed']:>4} | {f['baseline']:>9.4f} {f['fp8']:>8.4f} {f['rel_gap']:>+8.3%} | {val}"
              f" | {r['seconds']['baseline']:>8.0f}s {r['seconds']['fp8']:>5.0f}s")
    for key, label in (("final_loss_gap", "final train-loss gap"), ("val_loss_gap", "validation-loss gap")):
        s = summary[key]
        if s is None:
            print(f"{label}: no values")
            continue
        std = f"{s['std']:.3%}" if s["std"] is not None else "n/a"
        print(f"{label} over {s['n']} seeds: mean {s['mean']:+.3%}, sample std {std}, "
              f"min..max {s['min']:+.3%}..{s['max']:+.3%} (DeepSeek: < 0.25%)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    p.add_argument("--dtype", default="", help="compute dtype of both runs (default: the config's)")
    p.add_argument("--workdir", default="", help="parent directory for the runs (default: a temp dir)")
    p.add_argument("--seeds", type=int, default=1, help="run seeds 0..N-1 (default 1: seed 0 only)")
    p.add_argument("--json", default="", help="also write every number printed (and the curves) to this file")
    a = p.parse_args()
    if a.seeds < 1:
        p.error("--seeds must be >= 1")

    parent = a.workdir or tempfile.mkdtemp(prefix="fp8_training_")
    # one seed: <parent>/{baseline,fp8} as before; several: <parent>/seed<s>/{baseline,fp8}
    seed_dirs = {s: parent if a.seeds == 1 else os.path.join(parent, f"seed{s}") for s in range(a.seeds)}
    dirs = {s: {name: os.path.join(d, name) for name in ("baseline", "fp8")} for s, d in seed_dirs.items()}
    for pair in dirs.values():
        for d in pair.values():
            if os.path.exists(os.path.join(d, "checkpoints")):
                print(f"fp8_training: {d} already holds checkpoints; pass an empty --workdir.", file=sys.stderr)
                return 2

    results, tok = [], ""
    for s in range(a.seeds):
        base, t_base = run(a.config, False, s, a, dirs[s]["baseline"], tok)
        if not tok:  # the first run trained the tokenizer: every later run loads it
            first = os.path.join(dirs[s]["baseline"], "tokenizer.json")
            tok = first if os.path.exists(first) else ""
        fp8, t_fp8 = run(a.config, True, s, a, dirs[s]["fp8"], tok)
        results.append(compare(s, base, fp8, t_base, t_fp8))
        if a.seeds > 1:
            f = results[-1]["final_loss"]
            print(f"seed {s}: baseline {t_base:.0f} s, fp8 {t_fp8:.0f} s; final loss gap {f['rel_gap']:+.3%}",
                  flush=True)

    summary = {"final_loss_gap": spread([r["final_loss"]["rel_gap"] for r in results]),
               "val_loss_gap": spread([r["val_loss"]["rel_gap"] for r in results if r["val_loss"]])}
    if a.seeds == 1:
        print_single(results[0], a)
    else:
        print_seeds(results, summary, a)
    if a.json:
        out = {"config": os.path.abspath(a.config), "steps": a.steps, "log_every": a.log_every,
               "dtype": a.dtype or "config", "seeds": a.seeds, "workdir": os.path.abspath(parent),
               "tokenizer": tok, "runs": results, "summary": summary}
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
