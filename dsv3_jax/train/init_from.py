"""`config.init_from`: a new run starting from weights made elsewhere.

    --config.init_from=DIR     another run's workdir, the converter's output (checkpoints/ inside), or a released-
                               format (Hugging Face) directory, BF16 or FP8 (config.json + safetensors)

Only the parameters and router biases are taken; the step, the optimizer and the data position start afresh, and
the run's own checkpoints then resume it as usual (the loop reads init_from only while its workdir has none). The
tokenizer comes with the weights: DIR/tokenizer.json unless `config.data.tokenizer_path` names one (and with it
a chat template, for `data.prepare --chat --tokenizer DIR`). The architecture must be the config's: a difference is
an error naming the fields, before anything is trained. One difference is how DeepSeek-V3.2 was made: weights
without sparse-attention indexers (V3 / V3.1) into a config with them start the indexers from their
initialisation (said in one line), for DSA's dense warm-up (`config.model.dsa.stage`).
"""
from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np
from flax import nnx, traverse_util

from dsv3_jax import lora, param_kinds
from dsv3_jax.cli import ConfigError, UserError
from dsv3_jax.io import tokenizer as tokenizer_io
from dsv3_jax.io.checkpoint import Checkpointer, Reshaped
from dsv3_jax.moe import RouterBias


def kind(src: str) -> str:
    """'run' (checkpoints/ inside), 'hf' (config.json + safetensors) or '' (neither)."""
    if os.path.isdir(os.path.join(src, "checkpoints")):
        return "run"
    if os.path.isfile(os.path.join(src, "config.json")):
        return "hf"
    return ""


def check(src: str) -> None:
    """A config error naming config.init_from unless it is empty or one of the kinds above."""
    if src and not kind(src):
        raise ConfigError(f"config.init_from={src!r} holds neither checkpoints/ (a run's workdir or the converter's "
                          f"output) nor config.json (a released-format checkpoint); point it at one of those.",
                          key="init_from")


def tokenizer_path(config) -> str | None:
    """The tokenizer a run uses: config.data.tokenizer_path, else that of the weights it starts from, else None (one
    is trained on the corpus)."""
    if config.data.tokenizer_path:
        return config.data.tokenizer_path
    src = os.path.join(config.get("init_from", ""), tokenizer_io.TOKENIZER_FILENAME)
    return src if config.get("init_from", "") and os.path.isfile(src) else None


def initial_weights(src: str, target, fresh: dict, quiet: bool, model_cfg=None, program=None, runtime=None) -> dict:
    """{params, biases} from `src`, as this run holds them: `target(meta)` is the restore target of a run directory
    (layout and shardings); `fresh` the run's initialised state (its shardings, and the indexers' values when the
    weights have none). A released-format directory is read with `hf.load` (`model_cfg`, `program` for the state
    layout, `runtime` the run's: an FP8-resident base is read FP8 as stored)."""
    if kind(src) == "hf":
        out, n_new = _from_hf(src, fresh, model_cfg, program, runtime)
        step = "released weights"
    else:
        out, n_new, step = _from_run(src, target, fresh)
        step = f"step {step}"
    if not quiet:
        extra = f"; {n_new:,} new parameters (indexers, adapters) initialised" if n_new else ""
        print(f"initialised from the weights of {src} ({step}); optimizer, step and data start afresh{extra}")
    return out


def _from_run(src: str, target, fresh: dict):
    """A run directory's newest checkpoint (its optimizer state, step and data position are not read)."""
    ckpt = Checkpointer(os.path.join(os.path.abspath(src), "checkpoints"), keep=None, async_save=False)
    try:
        if ckpt.latest_step() is None:
            raise UserError(f"config.init_from={src!r}: its checkpoints/ directory holds no checkpoint")
        saved = {_key(p) for p in traverse_util.flatten_dict(ckpt.saved_abstract().get("params", {}))}
        new = {p for p in traverse_util.flatten_dict(fresh["params"]) if _key(p) not in saved and _addable(p)}

        def read(meta):
            t = target(meta)
            if not new:
                return t
            if isinstance(t, Reshaped):
                raise UserError(f"config.init_from={src!r} lacks the new parameters (sparse-attention indexers or "
                                f"LoRA adapters); start from it without a pipeline (config.mesh.stage=1)")
            return dict(t, params=_without(t["params"], new))

        got = ckpt.load(read, log=lambda msg: print(msg, file=sys.stderr), partial=True)
    finally:
        ckpt.close()
    out = {k: got[1][k] for k in ("params", "biases")}
    out["params"], n_new = _with_fresh(out["params"], fresh["params"], new)
    return out, n_new, got[0]


def _from_hf(src: str, fresh: dict, model_cfg, program, runtime):
    """A released-format directory (BF16, or FP8 dequantised into the run's parameter dtype; kept FP8 when the run
    holds its base FP8-resident, `config.lora.fp8_base`)."""
    from dsv3_jax.interop import hf

    hfc = hf.parse_config(hf.read_config(src))
    want = model_cfg
    if model_cfg.dsa and not hfc.model.dsa:  # V3 weights for a V3.2 run: the network without its indexers
        want = dataclasses.replace(model_cfg, index_topk=0)
    _check_same(src, hfc.model, want)
    fp8 = runtime is not None and runtime.fp8_resident is not None
    got, model = hf.load(src, want.compute_dtype, param_dtype=want.weight_dtype, keep_fp8=fp8,
                         fp8_mode=runtime.fp8_weights if fp8 else "w8a8")  # (no adapters: the base)
    _check_same(src, got, want)  # (the MTP depth the tensors hold: transformers' save_pretrained drops it)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    biases = nnx.to_pure_dict(nnx.state(model, RouterBias))
    fresh_layers = program.to_layers({"params": fresh["params"]})["params"]
    have = {_key(p) for p in traverse_util.flatten_dict(params)}
    new = {p for p in traverse_util.flatten_dict(fresh_layers) if _key(p) not in have and _addable(p)}
    params, n_new = _with_fresh(params, fresh_layers, new)
    state = program.to_layout({"params": params, "biases": biases})
    shardings = jax.tree.map(lambda x: x.sharding, {"params": fresh["params"], "biases": fresh["biases"]})
    return jax.device_put(state, shardings), n_new


def _check_same(src: str, theirs, want) -> None:
    """UserError naming every architecture field of `theirs` that is not the run's (`want`)."""
    theirs = dataclasses.replace(theirs, dtype=want.dtype, param_dtype=want.param_dtype,
                                 initializer_range=want.initializer_range)
    if not want.dsa and not theirs.dsa:  # (the indexer's shape fields mean nothing without one)
        theirs = dataclasses.replace(theirs, index_n_heads=want.index_n_heads, index_head_dim=want.index_head_dim)
    diff = [f"{f.name} {getattr(theirs, f.name)!r} (config: {getattr(want, f.name)!r})"
            for f in dataclasses.fields(want) if getattr(theirs, f.name) != getattr(want, f.name)]
    if diff:
        raise UserError(f"config.init_from={src!r} is another network: {'; '.join(diff[:6])}; set those "
                        f"config.model keys to the checkpoint's")


def _key(path) -> tuple[str, ...]:
    """A parameter path compared across trees (a checkpoint's metadata names list items '0', a state 0)."""
    return tuple(str(k) for k in path)


def _addable(path) -> bool:
    """Parameters a run may add to the weights it starts from: sparse-attention indexers (V3 -> V3.2) and LoRA
    adapters (the base of a fine-tune)."""
    return param_kinds.in_indexer(path) or lora.is_adapter(path)


def _with_fresh(params: dict, fresh_params: dict, new: set) -> tuple[dict, int]:
    """`params` with the `new` leaves taken from `fresh_params` (their initialisation), and how many values."""
    flat = traverse_util.flatten_dict(fresh_params)
    kept = {p: flat[p] for p in new}
    n = sum(int(np.prod(v.shape)) for v in kept.values())
    return traverse_util.unflatten_dict(traverse_util.flatten_dict(params) | kept), n


def _without(params: dict, paths: set) -> dict:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in paths})
