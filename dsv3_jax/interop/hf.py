"""Load and save the released DeepSeek-V3 checkpoint format (Hugging Face safetensors, BF16/FP32 or FP8).

    from dsv3_jax.interop import hf
    config, model = hf.load("DeepSeek-V3/", dtype=jnp.bfloat16)   # -> ModelConfig, DeepSeekV3
    logits = model(tokens).logits
    hf.save(model, config, "out/")            # transformers' DeepseekV3ForCausalLM.from_pretrained reads it
    tokenizer = hf.load_tokenizer("DeepSeek-V3/")
    cfg = hf.config_from_hf(hf.read_config("DeepSeek-V3/"))        # config.json alone -> ModelConfig

This module is the interop's front door. Behind it: hf_config.py maps config.json <-> ModelConfig (its
public names, `config_from_hf`, `config_to_hf`, `parse_config`, `read_config`, `CONFIG_FILE`, are
re-exported here, where infer.py, serve.py and the benchmarks call them); hf_checkpoint.py opens a
directory and checks every tensor against the plan from the headers alone; layout.py says which tensor
fills which slice of which parameter; safetensors_io.py reads and writes the bytes.

`load` opens the directory (every check happens there, before any data is read), creates each
parameter on the device(s) empty and already sharded, then fills it one (parameter, layer) slice at a
time: a host buffer for the slice, each HF tensor of that slice read into it (FP8 dequantised with its
128x128 `weight_scale_inv` blocks, or with `keep_fp8=True` kept as the e4m3 blocks and their scales:
FP8-resident weights, dsv3_jax/fp8/resident.py), then a donated in-place update on the device(s). The
MTP layer (`model.layers.{num_hidden_layers}`) is loaded when present; transformers' `save_pretrained`
drops it, so `mtp="auto"` loads a directory without it as a model without MTP (with a warning).

`save` writes config.json in the release's spelling (`rope_scaling`), per-expert tensors in [out, in]
layout, the MTP layers with their `embed_tokens` / `shared_head.head` copies, optionally FP8 weights
with scales, and tokenizer.json when given a tokenizer. Tensors are produced one at a time as the
shard writer reaches them, so saving holds at most one tensor on the host.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import runtime as runtime_lib
from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8.quant import quantize_blocks
from dsv3_jax.interop import layout as L
from dsv3_jax.interop import safetensors_io as st
from dsv3_jax.interop.hf_checkpoint import Checkpoint, open_checkpoint
from dsv3_jax.interop.hf_config import CONFIG_FILE, config_from_hf, config_to_hf, parse_config, read_config
from dsv3_jax.io import tokenizer as tokenizer_io
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.moe import RouterBias
from dsv3_jax.runtime import Runtime

__all__ = ["CONFIG_FILE", "config_from_hf", "config_to_hf", "load", "load_tokenizer", "open_checkpoint",
           "parse_config", "read_config", "save"]


# ---------------------------------------------------------------------- load

def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def load(path: str, dtype=jnp.float32, *, param_dtype=None, mtp: str | bool = "auto", mesh=None,
         runtime: Runtime | None = None, keep_fp8: bool = False, fp8_mode: str = "w8a8",
         **overrides) -> tuple[ModelConfig, DeepSeekV3]:
    """Read a released-format directory into a ready DeepSeekV3 (with its MTP modules when present).

    dtype: compute dtype, and the parameter dtype unless `param_dtype` is given. mtp: "auto" (load the
    MTP layers when the checkpoint has them), True (require them), False (skip them). mesh: place each
    parameter with its sharding from dsv3_jax.sharding on this jax Mesh. runtime: how the model runs
    (default: this backend, no mesh; see dsv3_jax.runtime). `overrides` set other ModelConfig fields.

    keep_fp8: keep every projection and expert weight as float8_e4m3fn plus its float32 128x128 block
    scales (dsv3_jax/fp8/resident.py): an FP8 checkpoint's blocks exactly as stored, a BF16/F32 one
    quantised on load. Everything else (embedding, head, norms, router, biases, eh_proj) loads in
    `param_dtype` as without it. fp8_mode: 'w8a8' (activations quantised 1x128, DeepSeek's serving
    recipe) or 'weight_only' (activations unquantised; equal to the dequantised model up to f32 rounding).

    Streaming: parameters are created on the device(s) first and filled one layer slice of one parameter
    at a time, so host memory holds at most one such slice (one layer of one stacked weight) beside the
    largest unstacked one (the embedding), however deep the model.
    """
    name = _dtype_name(dtype)
    overrides.update(dtype=name, param_dtype=_dtype_name(param_dtype or dtype))
    if keep_fp8:
        runtime = (runtime or runtime_lib.default()).with_fp8_weights(fp8_mode)
    elif runtime is not None and runtime.fp8_weights:
        raise UserError("hf.load: the runtime holds FP8-resident weights (fp8_weights) but keep_fp8=False; pass "
                        "keep_fp8=True or a float runtime")
    ck = open_checkpoint(path, mtp=mtp, runtime=runtime, **overrides)
    if keep_fp8 and (ck.hf.fp8_block or (128, 128)) != (128, 128):
        raise UserError(f"{path}: weight_block_size={list(ck.hf.fp8_block)}; FP8-resident weights use the release's "
                        f"128x128 blocks. Load it without keep_fp8 (dequantised)")
    arrays = _StreamedLeaves(ck.plan.leaves, _leaf_shardings(ck, mesh))
    for unit in _load_units(ck):
        arrays.fill(unit, lambda piece, dest: _read_into(ck, piece, dest))
    ck.check_aliases()
    flat = arrays.result()
    params = L.unflatten_into(nnx.to_pure_dict(ck.params_state), {p[1:]: a for p, a in flat.items()
                                                                   if p[0] == "params"})
    biases = L.unflatten_into(nnx.to_pure_dict(ck.biases_state), {p[1:]: a for p, a in flat.items()
                                                                   if p[0] == "biases"})
    return ck.config, nnx.merge(ck.graphdef, params, biases)


def _load_units(ck: Checkpoint) -> list[tuple[L.Path, tuple, list[L.Piece]]]:
    """Pieces grouped by (leaf, layer): each group fills one layer slice of one leaf (the whole leaf when it is
    not stacked), visited in on-disk order of their first tensor."""
    groups: dict[tuple, list[L.Piece]] = {}
    for piece in ck.plan.pieces:
        groups.setdefault((piece.leaf, piece.index[:1]), []).append(piece)
    units = [(leaf, lead, sorted(ps, key=lambda p: ck.tensors.order(p.key))) for (leaf, lead), ps in groups.items()]
    return sorted(units, key=lambda u: ck.tensors.order(u[2][0].key))


def _read_into(ck: Checkpoint, piece: L.Piece, dest: dict[L.Path, np.ndarray]):
    """Write one piece into the host buffers `dest` (leaf path -> buffer for this unit's slice)."""
    sub = piece.index[1:] if len(piece.index) else ()
    leaf = piece.leaf
    if L.is_fp8_leaf(ck.plan.leaves[leaf]):
        q, scale = ck.read_fp8_piece(piece)
        block = dest[leaf][sub].shape if sub else dest[leaf].shape
        y = L.to_ours_fp8(q, piece.kind, block, ck.config, ck.fmt)
        _assign(dest[leaf], sub, y)
        _assign(dest[L.scale_leaf(leaf)], sub, scale)
        return
    _assign(dest[leaf], sub, ck.read_piece(piece, dest[leaf].dtype))


def _assign(buf: np.ndarray, sub: tuple, value: np.ndarray):
    if sub:
        buf[sub] = value
    else:
        buf[...] = value


class _StreamedLeaves:
    """Device arrays of every leaf, created empty (zeros, already sharded) and filled one (leaf, layer) unit
    at a time: a host buffer for the unit's slice, then a donated in-place update on the device(s)."""

    def __init__(self, leaves: dict[L.Path, jax.ShapeDtypeStruct], shardings):
        # The in-place updates run on an Auto-typed copy of the mesh (an Explicit mesh would want every update
        # sharded like its destination); `result` hands the arrays over to the caller's mesh.
        self.final = shardings
        self.shardings = None if shardings is None else {p: _auto(s) for p, s in shardings.items()}
        self.leaves, self.arrays = leaves, {}
        fp8 = {p for p, sds in leaves.items() if L.is_fp8_leaf(sds)}
        self.companions = {p: [p, L.scale_leaf(p)] if p in fp8 else [p] for p in leaves}

    def _dtype(self, path):
        return np.float32 if path[0] == "biases" else np.dtype(self.leaves[path].dtype)

    def _array(self, path):
        if path not in self.arrays:
            sds = self.leaves[path]
            sharding = None if self.shardings is None else self.shardings[path]
            self.arrays[path] = _zeros(tuple(sds.shape), self._dtype(path), sharding)
        return self.arrays[path]

    def fill(self, unit, read):
        leaf, lead, pieces = unit
        targets = self.companions[leaf]
        host = {p: np.zeros(self.leaves[p].shape[len(lead):], self._dtype(p)) for p in targets}
        for piece in pieces:
            read(piece, host)
        for p in targets:
            sharding = None if self.shardings is None else self.shardings[p]
            if lead:
                self.arrays[p] = _set_layer(self._array(p), jnp.asarray(host.pop(p)), lead[0], sharding)
            else:
                self.arrays[p] = jax.device_put(host.pop(p), sharding) if sharding else jnp.asarray(host.pop(p))

    def result(self) -> dict:
        missing = [p for p in self.leaves if p not in self.arrays]
        if missing:
            raise AssertionError(f"hf.load filled no data into {missing[:3]}")
        if self.final is None:
            return self.arrays
        return {p: jax.device_put(a, self.final[p]) for p, a in self.arrays.items()}


def _auto(s):
    """The same NamedSharding on a mesh whose axes are all Auto."""
    from jax.sharding import NamedSharding

    from dsv3_jax.sharding import auto_mesh

    return NamedSharding(auto_mesh(s.mesh), s.spec)


def _zeros(shape, dtype, sharding):
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _set_layer_jit(arr, value, i, sharding):
    out = jax.lax.dynamic_update_index_in_dim(arr, value.astype(arr.dtype), i, 0)
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


def _set_layer(arr, value, i: int, sharding):
    """arr[i] = value on the device(s), in place (the old buffer is donated)."""
    return _set_layer_jit(arr, value, jnp.int32(i), sharding)


def _leaf_shardings(ck: Checkpoint, mesh):
    if mesh is None:
        return None
    from jax.sharding import NamedSharding

    return {p: NamedSharding(mesh, spec) for p, spec in L.leaf_specs(ck.params_state, ck.biases_state).items()}


# ---------------------------------------------------------------------- save

def save(model: DeepSeekV3, config: ModelConfig | None, path: str, *, dtype=None, fp8: bool = False,
         fp8_block=(128, 128), mtp: bool = True, tokenizer=None, max_shard_bytes: int = 5 * 2**30,
         merge_lora: bool = False) -> list[str]:
    """Write `model` as a released-format directory at `path`; returns the safetensors file names.

    dtype: tensor dtype on disk (default: the model's parameter dtype). fp8: store projection weights
    (attention, dense MLP, routed and shared experts) as F8_E4M3 with `weight_scale_inv` 128x128 blocks,
    the rest in `dtype` (router bias always float32). mtp: include the MTP layers (with the
    `embed_tokens` / `shared_head.head` copies the release carries). tokenizer: a `tokenizers.Tokenizer`
    to write as tokenizer.json. merge_lora: fold a LoRA model's adapters into its weights first (`lora.merged`;
    with fp8 the merged weights are quantised again).
    """
    if getattr(model.runtime, "lora", None) is not None:
        if not merge_lora:
            raise UserError("hf.save: the model carries LoRA adapters; pass merge_lora=True to fold them into the "
                            "weights (the released format has no adapters)", key="merge_lora")
        from dsv3_jax import lora

        model = lora.merged(model)
    cfg = model.cfg if config is None else config
    dtypes = {"dtype", "param_dtype"}  # the checkpoint records neither (the caller picks them on load)
    differ = sorted(f.name for f in dataclasses.fields(cfg)
                    if f.name not in dtypes and getattr(cfg, f.name) != getattr(model.cfg, f.name))
    if differ:
        raise UserError(f"hf.save: config differs from the model's own config in {differ}; pass config=None "
                        f"(or model.cfg) to save the model as it is")
    depth = len(model.mtp) if mtp else 0
    cfg_out = cfg.replace(num_nextn_predict_layers=depth) if depth != cfg.num_nextn_predict_layers else cfg
    params = L.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)), ("params",))
    biases = L.flatten(nnx.to_pure_dict(nnx.state(model, RouterBias)), ("biases",))
    arrays = {**params, **{k: v for k, v in biases.items()}}
    arrays = {k: v for k, v in arrays.items() if not (k[1] == "mtp" and k[2] >= depth)}
    leaves = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
    plan = L.plan(cfg_out, L.Format(mtp_layers=depth), leaves)
    out_dtype = np.dtype(dtype if dtype is not None else cfg.weight_dtype)
    os.makedirs(path, exist_ok=True)

    def slice_of(piece):
        return np.asarray(jax.device_get(arrays[piece.leaf][piece.index] if piece.index else arrays[piece.leaf]))

    planned = []
    for piece in plan.pieces:
        shape = plan.expected[piece.key]
        if piece.leaf[0] == "biases":
            planned.append(st.PlannedTensor(piece.key, shape, np.dtype(np.float32),
                                            lambda p=piece: slice_of(p).astype(np.float32)))
        elif fp8 and piece.key in plan.quantizable:
            planned += _fp8_tensors(piece, shape, fp8_block, slice_of)
        else:
            planned.append(st.PlannedTensor(piece.key, shape, out_dtype,
                                            lambda p=piece: L.to_hf(slice_of(p), p.kind).astype(out_dtype)))
    by_key = {t.name: t for t in planned}
    for a in plan.aliases:
        src = by_key[a.source]
        planned.append(st.PlannedTensor(a.key, src.shape, src.dtype, src.produce))
    names = st.write_shards(path, planned, max_shard_bytes)
    hf_dict = config_to_hf(cfg_out, torch_dtype=out_dtype.name, fp8_block=fp8_block if fp8 else None)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(hf_dict, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": hf_dict["bos_token_id"], "eos_token_id": hf_dict["eos_token_id"]}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(os.path.join(path, tokenizer_io.TOKENIZER_FILENAME))
    return names


def _fp8_tensors(piece, shape, block, slice_of):
    cache = {}

    def quantized():
        if "q" not in cache:
            w = L.to_hf(slice_of(piece), piece.kind).astype(np.float32)
            q, scale = quantize_blocks(jnp.asarray(w), block=tuple(block))
            cache["q"], cache["s"] = np.asarray(q[: w.shape[0], : w.shape[1]]), np.asarray(scale)
        return cache["q"]

    def scale():
        quantized()
        s = cache.pop("s")
        cache.clear()
        return s

    sshape = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    return [st.PlannedTensor(piece.key, shape, np.dtype(st.DTYPES["F8_E4M3"]), quantized),
            st.PlannedTensor(piece.key + st.SCALE_SUFFIX, sshape, np.dtype(np.float32), scale)]


# ---------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str):
    """`tokenizers.Tokenizer` from DIR/tokenizer.json (or a tokenizer.json path)."""
    f = path if path.endswith(".json") else os.path.join(path, tokenizer_io.TOKENIZER_FILENAME)
    return tokenizer_io.load_tokenizer(f, what=f"the checkpoint's {tokenizer_io.TOKENIZER_FILENAME}")
