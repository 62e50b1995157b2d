"""Load a model trained by train.py from its workdir: the config from the checkpoint's metadata, the
tokenizer from WORKDIR/tokenizer.json (or the config's tokenizer_path), parameters and router biases
from the latest (or a given) orbax checkpoint."""
from __future__ import annotations

import json
import os

import jax
import ml_collections
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.train import data as data_lib
from dsv3_jax.train.checkpoint import Checkpointer


def abstract_train_state(model_cfg: ModelConfig, tx):
    """(graphdef, abstract state) of `loop.init_state` without allocating anything."""
    from dsv3_jax.train.loop import init_state

    box = {}

    def build():
        box["graphdef"], state = init_state(model_cfg, tx, 0, False)
        return state

    abstract = jax.eval_shape(build)
    return box["graphdef"], abstract


def load_trained(workdir: str, step: int | None = None):
    """-> (model, tokenizer, config ConfigDict, step). Clear errors for a missing or empty workdir."""
    from dsv3_jax.train.loop import make_schedules

    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(ckdir):
        raise FileNotFoundError(f"no checkpoints in {workdir!r}: train one first with "
                                f"`python train.py --workdir {workdir}`")
    ckpt = Checkpointer(ckdir, async_save=False)
    try:
        step, meta = ckpt.restore_meta(step)
        if "config" not in meta:
            raise ValueError(f"checkpoint {ckdir}/{step} has no config in its metadata; it was not written by "
                             f"train.py")
        config = ml_collections.ConfigDict(json.loads(meta["config"]))
        model_cfg = ModelConfig.from_dict(config.model)
        graphdef, abstract = abstract_train_state(model_cfg, make_schedules(config)[0])
        _, state, _ = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, state["params"], state["biases"])
    tokenizer = data_lib.load_tokenizer(config.data.tokenizer_path or os.path.join(workdir, "tokenizer.json"))
    return model, tokenizer, config, step
