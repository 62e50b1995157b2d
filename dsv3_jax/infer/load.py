"""Load a model for inference: from a train.py / converter workdir (the config from the checkpoint's
metadata, the tokenizer from WORKDIR/tokenizer.json or the config's tokenizer_path, parameters and router
biases from the latest good or a given orbax checkpoint), or from a released-format (HF) directory."""
from __future__ import annotations

import json
import os
import sys

import jax.numpy as jnp
import ml_collections
from flax import nnx

from dsv3_jax import runtime as runtime_lib
from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.io.checkpoint import Checkpointer, weights_target
from dsv3_jax.io.tokenizer import load_tokenizer
from dsv3_jax.programs import Plain
from dsv3_jax.runtime import Runtime


def load_trained(workdir: str, step: int | None = None, runtime: Runtime | None = None, fp8_mode: str = "w8a8"):
    """-> (model, tokenizer, config ConfigDict, step). Clear errors for a missing or empty workdir.
    `runtime`: how the model runs (default: the checkpoint's config resolved for this backend, no mesh). A
    converter output written with --keep_fp8 loads onto FP8-resident weights, GEMMs in `fp8_mode`."""
    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(ckdir):
        raise FileNotFoundError(f"no checkpoints in {workdir!r}: train one first with "
                                f"`python train.py --workdir {workdir}`")
    found = {}

    def target(meta):  # params and biases of train.py's state, or of the converter's weights-only output
        if "config" not in meta:
            raise UserError(f"a checkpoint in {ckdir} has no config in its metadata; it was not written by "
                            f"train.py or the converter")
        config = ml_collections.ConfigDict(json.loads(meta["config"]))
        model_cfg = ModelConfig.from_dict(config.model)
        rt = runtime or runtime_lib.from_config(config)
        if meta.get("keep_fp8"):
            rt = rt.without_fp8_gemms().with_fp8_weights(fp8_mode)
        tokenizer = load_tokenizer(config.data.tokenizer_path or os.path.join(workdir, "tokenizer.json"),
                                   what=f"--checkpoint {workdir}")  # before any array is read
        graphdef, abstract = weights_target(model_cfg, rt)
        found.update(config=config, graphdef=graphdef, tokenizer=tokenizer)
        return Plain().restore_target(abstract, meta)  # any layout (a pipelined run's slots) -> the layers

    with Checkpointer(ckdir, async_save=False) as ckpt:  # a corrupt newer step is reported, never moved
        got = ckpt.load(target, step, partial=True, log=lambda m: print(m, file=sys.stderr))
    if got is None:
        raise FileNotFoundError(f"no finalized checkpoint in {ckdir}: train one first with "
                                f"`python train.py --workdir {workdir}`")
    step, state, _ = got
    model = nnx.merge(found["graphdef"], state["params"], state["biases"])
    return model, found["tokenizer"], found["config"], step


def load_hf(directory: str, runtime: Runtime | None = None, keep_fp8: bool = False, fp8_mode: str = "w8a8",
            mesh=None):
    """-> (model, tokenizer) from a released-format (Hugging Face safetensors) directory, computing in float32.
    keep_fp8: projections and experts stay FP8-resident (GEMMs in `fp8_mode`); mesh: place the parameters.

    Uses `dsv3_jax.interop.hf.load` (imported here, so plain train.py workdirs never need it) and
    DIR/tokenizer.json."""
    from dsv3_jax.interop import hf

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--hf {directory!r} is not a directory")
    tok_path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"{tok_path} does not exist: a released-format directory carries tokenizer.json")
    tokenizer = load_tokenizer(tok_path, what="--hf")  # a bad tokenizer fails before the weights load
    _, model = hf.load(directory, dtype=jnp.float32, runtime=runtime, keep_fp8=keep_fp8, fp8_mode=fp8_mode, mesh=mesh)
    return model, tokenizer
