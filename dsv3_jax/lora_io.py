"""LoRA adapters apart from their run: exported as their own small checkpoint, attached to a base.

    python -m dsv3_jax.lora_io export --workdir RUN --output DIR     # the adapters of a LoRA run (dsv3_jax/lora.py)
    python infer.py --hf BASE --lora DIR ...  /  python serve.py --hf BASE [--keep_fp8] --lora DIR

DIR holds an orbax step of the adapter arrays alone (a rank-16 adapter set of V3 671B is 98.6M values), its meta the
options and the base's architecture, and the run's tokenizer.json. `attach(base, DIR)` rebuilds the base with the
adapters (a base loaded FP8-resident serves them over its FP8 GEMMs) and refuses another network naming the fields.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

from flax import nnx, traverse_util

from dsv3_jax import cli
from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.load import load_trained
from dsv3_jax.io.checkpoint import Checkpointer
from dsv3_jax.lora import ADAPTERS, LoraOptions
from dsv3_jax.model import DeepSeekV3, split_model

FORMAT = "dsv3_jax.lora/1"


def export_adapters(workdir: str, out: str) -> dict:
    """Write a LoRA run's adapters (its newest checkpoint) as their own small checkpoint in `out`: an orbax step of
    the adapter arrays alone, its meta the options and the base's architecture (`attach` checks it), and the run's
    tokenizer.json. Returns the meta."""
    model, _, _, step = load_trained(workdir)
    opts = model.runtime.lora
    if opts is None:
        raise UserError(f"{workdir} was trained without LoRA (config.lora.rank=0): it has no adapters to export")
    if os.path.exists(os.path.join(out, "checkpoints")):
        raise UserError(f"{out} already holds a checkpoint; choose another --output (nothing is overwritten)")
    flat = traverse_util.flatten_dict(split_model(model)[1])
    adapters = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] in ADAPTERS})
    meta = {"format": FORMAT, "rank": opts.rank, "alpha": opts.alpha, "targets": list(opts.targets),
            "model": json.loads(json.dumps(dataclasses.asdict(model.cfg))), "source": os.path.abspath(workdir),
            "step": int(step), "adapter_params": int(sum(v.size for p, v in flat.items() if p[-1] in ADAPTERS))}
    with Checkpointer(os.path.join(out, "checkpoints"), async_save=False) as ck:
        ck.save(0, {"params": adapters}, meta, force=True)
    tok = os.path.join(workdir, "tokenizer.json")
    if os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(out, "tokenizer.json"))
    return meta


def attach(model, directory: str):
    """`model` (a base: a released-format checkpoint loaded with hf.load, FP8-resident or not, or any DeepSeekV3)
    with the adapters exported to `directory` (`export_adapters`): a new model whose projections carry them. The
    base must be the network they were trained on (UserError naming the fields that differ)."""
    with Checkpointer(os.path.join(directory, "checkpoints"), async_save=False) as ck:
        step, meta = ck.restore_meta()
        if meta.get("format") != FORMAT:
            raise UserError(f"{directory} holds no LoRA adapters (format {meta.get('format')!r}); export them with "
                            f"python -m dsv3_jax.lora_io export --workdir RUN --output DIR")
        theirs = ModelConfig.from_dict(meta["model"])
        own = ("dtype", "param_dtype", "initializer_range")  # (how the base is held, not what it is)
        diff = [f.name for f in dataclasses.fields(theirs)
                if f.name not in own and getattr(theirs, f.name) != getattr(model.cfg, f.name)]
        if diff:
            raise UserError(f"the adapters in {directory} were trained on another network ({', '.join(diff[:6])} "
                            f"differ); attach them to the base they were trained on")
        opts = LoraOptions(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=tuple(meta["targets"]))
        rt = dataclasses.replace(model.runtime, lora=opts)
        graphdef, abstract, _ = split_model(nnx.eval_shape(lambda: DeepSeekV3(model.cfg, rngs=nnx.Rngs(0),
                                                                               runtime=rt)))
        flat = traverse_util.flatten_dict(abstract)
        target = {"params": traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-1] in ADAPTERS})}
        _, got, _ = ck.restore(target, step)
    _, params, biases = split_model(model)
    merged = traverse_util.flatten_dict(params) | traverse_util.flatten_dict(got["params"])
    return nnx.merge(graphdef, traverse_util.unflatten_dict(merged), biases)


def main(argv=None) -> int:
    """python -m dsv3_jax.lora_io export --workdir RUN --output DIR"""

    p = cli.ArgumentParser(prog="python -m dsv3_jax.lora_io", description="LoRA adapters of a fine-tuning run")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a LoRA run's adapters as their own small checkpoint")
    e.add_argument("--workdir", required=True, help="the LoRA run's workdir")
    e.add_argument("--output", required=True, help="the directory to write (must not hold a checkpoint)")

    def run():
        args = p.parse_args(argv)
        meta = export_adapters(args.workdir, args.output)
        print(f"exported {meta['adapter_params']:,} adapter parameters (rank {meta['rank']}, "
              f"{', '.join(meta['targets'])}) of {args.workdir} step {meta['step']} -> {args.output}")
        return 0

    return cli.call(run, "python -m dsv3_jax.lora_io", argv)


if __name__ == "__main__":
    sys.exit(main())
