"""DeepSeek Sparse Attention's two training stages on the tiny config (CPU, embedded corpus), as V3.2 was trained:

    1. base     configs/tiny.py (dense MLA, V3) for --base_steps: the model V3.2 starts from (V3.1-Terminus there)
    2. warm-up  configs/tiny_dsa.py, dsa.stage=dense_warmup, --config.init_from=base: the indexers are new; the
                attention stays dense and only the indexers train, toward its distribution (KL)
    3. sparse   dsa.stage=sparse, --config.init_from=warm-up: each query attends to its index_topk=32 keys of up
                to 128; everything trains, the indexers on their KL to the sparse attention (detached)
    and, for comparison, the base trained on for as many steps as 2 + 3 took, still dense.

Prints every stage's indexer KL, top-k recall of the dense attention mass, and loss per --every steps, and one JSON
line. The README's DSA training table is this output.

    python benchmarks/dsa_two_stage.py [--base_steps 300 --warm_steps 100 --sparse_steps 100] [--workdir DIR]
"""
from __future__ import annotations

import _common  # noqa: F401  (repository root on sys.path)

import argparse
import json
import os
import tempfile

from dsv3_jax.analysis import load_config
from dsv3_jax.train.loop import train


def stage(name: str, steps: int, workdir: str, init_from: str = "", dsa_stage: str | None = None, every: int = 10):
    c = load_config("tiny_dsa" if dsa_stage else "tiny")
    if dsa_stage:
        c.model.dsa.stage = dsa_stage
    c.init_from = init_from
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.sample_tokens = steps, every, steps, 0
    c.train.warmup_steps = min(c.train.warmup_steps, steps // 10)
    c.checkpoint.every_steps = steps
    out = train(c, os.path.join(workdir, name), quiet=True)
    return [{k: r.get(k) for k in ("step", "loss", "val_loss", "indexer_kl", "index_recall")} for r in out.history]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_steps", type=int, default=300)
    p.add_argument("--warm_steps", type=int, default=100)
    p.add_argument("--sparse_steps", type=int, default=100)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    a = p.parse_args()
    workdir = a.workdir or tempfile.mkdtemp(prefix="dsa-two-stage-")
    runs = {"base": stage("base", a.base_steps, workdir, every=a.every)}
    runs["warmup"] = stage("warmup", a.warm_steps, workdir, os.path.join(workdir, "base"), "dense_warmup", a.every)
    runs["sparse"] = stage("sparse", a.sparse_steps, workdir, os.path.join(workdir, "warmup"), "sparse", a.every)
    runs["dense_on"] = stage("dense_on", a.warm_steps + a.sparse_steps, workdir, os.path.join(workdir, "base"),
                             every=a.every)
    print(f"{'stage':<10}{'step':>6}{'loss':>9}{'val_loss':>10}{'indexer KL':>12}{'recall':>9}")
    fmt = lambda v, w, d: f"{v:>{w}.{d}f}" if isinstance(v, float) else f"{'':>{w}}"  # noqa: E731
    for name, hist in runs.items():
        for r in hist:
            print(f"{name:<10}{r['step']:>6}{fmt(r['loss'], 9, 3)}{fmt(r['val_loss'], 10, 3)}"
                  f"{fmt(r['indexer_kl'], 12, 4)}{fmt(r['index_recall'], 9, 3)}")
    print(json.dumps({"workdir": workdir, "runs": runs}))


if __name__ == "__main__":
    main()
