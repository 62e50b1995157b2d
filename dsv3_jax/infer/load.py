"""Load a model trained by train.py from its workdir: the config from the checkpoint's metadata, the
tokenizer from WORKDIR/tokenizer.json (or the config's tokenizer_path), parameters and router biases
from the latest (or a given) orbax checkpoint."""
from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.train import data as data_lib
from dsv3_jax.train.checkpoint import Checkpointer


def abstract_train_state(model_cfg: ModelConfig, tx):
    """(graphdef, abstract state) shaped like train.py's state, {params, biases, opt_state, step, skipped},
    built with `nnx.eval_shape` / `jax.eval_shape`: nothing is allocated."""
    from dsv3_jax.model import DeepSeekV3
    from dsv3_jax.train.step import split_model

    model = nnx.eval_shape(lambda: DeepSeekV3(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params, biases = split_model(model)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = {"params": params, "biases": biases, "opt_state": jax.eval_shape(tx.init, params),
                "step": scalar, "skipped": scalar}
    return graphdef, abstract


def load_trained(workdir: str, step: int | None = None):
    """-> (model, tokenizer, config ConfigDict, step). Clear errors for a missing or empty workdir."""
    from dsv3_jax.train.loop import make_schedules

    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(ckdir):
        raise FileNotFoundError(f"no checkpoints in {workdir!r}: train one first with "
                                f"`python train.py --workdir {workdir}`")
    ckpt = Checkpointer(ckdir, async_save=False)
    found = {}

    def target(meta):  # the restore target from a step's meta: train.py state, or weights only
        if "config" not in meta:
            raise UserError(f"a checkpoint in {ckdir} has no config in its metadata; it was not written by "
                            f"train.py or the converter")
        config = ml_collections.ConfigDict(json.loads(meta["config"]))
        model_cfg = ModelConfig.from_dict(config.model)
        tokenizer = data_lib.load_tokenizer(config.data.tokenizer_path or os.path.join(workdir, "tokenizer.json"),
                                            what=f"--checkpoint {workdir}")  # before any array is read
        graphdef, abstract = abstract_train_state(model_cfg, make_schedules(config)[0])
        if meta.get("format") == "dsv3_jax.params":  # written by dsv3_jax.interop.convert: weights only
            abstract = {"params": abstract["params"], "biases": abstract["biases"]}
        found.update(config=config, graphdef=graphdef, tokenizer=tokenizer)
        return abstract

    try:
        if step is None:  # the newest step that restores; a corrupt newer one is reported, not moved
            got = ckpt.restore_latest_good(target, log=lambda m: print(m, file=sys.stderr), move_aside=False)
            if got is None:
                raise FileNotFoundError(f"no finalized checkpoint in {ckdir}: train one first with "
                                        f"`python train.py --workdir {workdir}`")
            step, state, _ = got
        else:
            _, meta = ckpt.restore_meta(step)
            _, state, _ = ckpt.restore(target(meta), step)
    finally:
        ckpt.close()
    config, graphdef, tokenizer = found["config"], found["graphdef"], found["tokenizer"]
    model = nnx.merge(graphdef, state["params"], state["biases"])
    return model, tokenizer, config, step


def load_hf(directory: str):
    """-> (model, tokenizer) from a released-format (Hugging Face safetensors) directory, computing in float32.

    Uses `dsv3_jax.interop.hf.load` (imported here, so plain train.py workdirs never need it) and
    DIR/tokenizer.json."""
    from dsv3_jax.interop import hf

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--hf {directory!r} is not a directory")
    tok_path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"{tok_path} does not exist: a released-format directory carries tokenizer.json")
    tokenizer = data_lib.load_tokenizer(tok_path, what="--hf")  # a bad tokenizer fails before the weights load
    _, model = hf.load(directory, dtype=jnp.float32)
    return model, tokenizer
