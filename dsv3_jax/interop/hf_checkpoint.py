"""An opened released-format checkpoint directory: config, tensor headers, and the plan, checked before any read.

    from dsv3_jax.interop import hf_checkpoint
    ck = hf_checkpoint.open_checkpoint("DeepSeek-V3/", mtp="auto")     # reads config.json and headers only
    ck.config, ck.plan.pieces                                           # ModelConfig, what fills what
    x = ck.read_piece(piece, np.float32)                                # one HF tensor (part), in our layout

A directory holds `config.json`, `model.safetensors` or shards `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, and usually `tokenizer.json` (REFERENCE.md section 5). `open_checkpoint`
parses config.json (hf_config.py) and every safetensors header (safetensors_io.py), detects the layout
(fused `gate_up_proj` experts or one tensor per expert, RoPE row order, MTP depth), builds the abstract
model and the plan of `layout.py` (which tensor fills which slice of which parameter), and checks the
whole checkpoint against that plan from the headers alone: missing, unexpected, mis-shaped and
wrongly typed tensors, and FP8 scales of the wrong block count, raise ONE UserError naming them before
any data is read. Both readers use it: `hf.load` (into device arrays) and `convert.py` (into orbax).

Reads: `read_piece` dequantises an FP8 tensor with its 128x128 `weight_scale_inv` blocks and reshapes it
into our leaf slice, cast to the leaf's dtype; `read_fp8_piece` keeps the E4M3 blocks and
their scales as stored (FP8-resident weights, dsv3_jax/fp8/resident.py), quantising a BF16/F32 tensor
with the package's block quantiser instead.

MTP: the layer `model.layers.{num_hidden_layers}` is loaded when present. transformers' `save_pretrained`
drops it, so `mtp="auto"` opens a directory without it as a model without MTP (with a warning); the
release also carries copies of `embed_tokens` and `lm_head` inside it (`embed_tokens`,
`shared_head.head`), which we share with the main model and only compare (`check_aliases`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.fp8.resident import quantize_weight
from dsv3_jax.interop import layout as L
from dsv3_jax.interop import safetensors_io as st
from dsv3_jax.interop.hf_config import HFConfig, parse_config, read_config
from dsv3_jax.runtime import Runtime

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Checkpoint:
    """An opened directory: parsed config, tensor headers, and the plan that maps them onto our tree."""

    path: str
    hf: HFConfig
    tensors: st.SafetensorsDir
    fmt: L.Format
    plan: L.Plan
    graphdef: Any
    params_state: Any
    biases_state: Any

    @property
    def config(self) -> ModelConfig:
        return self.hf.model

    def read_piece(self, piece: L.Piece, dtype) -> np.ndarray:
        """One HF tensor (part), dequantised and transformed into our leaf slice, cast to `dtype`."""
        x = self.tensors.read(piece.key, piece.select, piece.rows, self.hf.fp8_block or (128, 128))
        block = self.plan.leaves[piece.leaf].shape[len(piece.index):]
        y = L.to_ours(x, piece.kind, block, self.config, self.fmt)
        return np.asarray(y, dtype=dtype)

    def read_fp8_piece(self, piece: L.Piece) -> tuple[np.ndarray, np.ndarray]:
        """One projection tensor (part) as FP8 blocks: (q [out, in] float8_e4m3fn, scale [ceil(out/128),
        ceil(in/128)] float32), exactly as stored when the checkpoint holds it in E4M3, else quantised
        here with the package's block quantiser (what a BF16 checkpoint loaded with keep_fp8 gets)."""
        dtype = self.tensors.tensors[piece.key].dtype
        if dtype == "F8_E5M2":
            raise UserError(f"{piece.key} is stored as F8_E5M2; FP8-resident weights are E4M3. Load without keep_fp8")
        if dtype != "F8_E4M3":
            w = self.tensors.read(piece.key, piece.select, piece.rows)
            qw = quantize_weight(jnp.asarray(np.asarray(w, np.float32)))
            return np.asarray(qw.q), np.asarray(qw.s)
        q = self.tensors.read_raw(piece.key, piece.select, piece.rows)
        srows = None
        if piece.rows is not None:
            r0, r1 = piece.rows
            total = self.tensors.shape(piece.key)[len(piece.select)]
            if r0 % 128 or (r1 % 128 and r1 != total):
                raise UserError(f"{piece.key}: rows {r0}:{r1} of a fused FP8 tensor do not start and end on 128-row "
                                f"scale blocks; load it without keep_fp8 (dequantised)")
            srows = (r0 // 128, -(-r1 // 128))
        scale = self.tensors.read_raw(piece.key + st.SCALE_SUFFIX, piece.select, srows)
        return q, np.asarray(scale, np.float32)

    def check_aliases(self):
        """MTP `embed_tokens` / `shared_head.head` copies must equal the main tensors; warn if not."""
        for a in self.plan.aliases:
            x, y = self.tensors.read(a.key), self.tensors.read(a.source)
            if x.shape != y.shape or not np.array_equal(x, y):
                log.warning("%s differs from %s; dsv3_jax shares the main tensor with the MTP module and "
                            "ignores the copy", a.key, a.source)


def open_checkpoint(path: str, *, mtp: str | bool = "auto", runtime: Runtime | None = None,
                    **overrides) -> Checkpoint:
    """Parse config.json and every safetensors header, detect the layout, and check the tensors.
    `runtime`: how the model built from it will run (default: this backend, no mesh)."""
    path = os.path.abspath(os.fspath(path))
    hfc = parse_config(read_config(path), **overrides)
    tensors = st.SafetensorsDir(path)
    if hfc.text_prefixes:  # a multimodal wrapper (Mistral-Large-3): its language model only
        skipped = tensors.language_model(hfc.text_prefixes, hfc.skipped_prefixes)
        if skipped:
            log.warning("%s: loading the language model only; the other towers' %d tensors (%s...) are not loaded",
                        path, len(skipped), skipped[0])
    cfg = hfc.model
    depth = _mtp_depth(cfg, tensors, mtp)
    if depth != cfg.num_nextn_predict_layers:
        cfg = cfg.replace(num_nextn_predict_layers=depth)
        hfc = dataclasses.replace(hfc, model=cfg)
    first_moe = f"model.layers.{cfg.first_k_dense_replace}.mlp.experts."
    fused = cfg.has_moe and (first_moe + "gate_up_proj") in tensors
    fmt = L.Format(fused_experts=fused, rope_interleave=hfc.rope_interleave, mtp_layers=depth)
    graphdef, params_state, biases_state = L.abstract_states(cfg, runtime)
    plan = L.plan(cfg, fmt, L.model_leaves(params_state, biases_state))
    check_tensors(path, plan, tensors, cfg, hfc.fp8_block or (128, 128))
    return Checkpoint(path, hfc, tensors, fmt, plan, graphdef, params_state, biases_state)


def _mtp_depth(cfg: ModelConfig, tensors: st.SafetensorsDir, mtp) -> int:
    want = cfg.num_nextn_predict_layers
    present = [d for d in range(want) if f"model.layers.{cfg.num_hidden_layers + d}.eh_proj.weight" in tensors]
    if mtp is False or mtp == "no":
        return 0
    if mtp == "auto" and want and not present:
        log.warning("config.json has num_nextn_predict_layers=%d but the checkpoint holds no MTP layer "
                    "(model.layers.%d.*; transformers' save_pretrained drops it): loading without MTP",
                    want, cfg.num_hidden_layers)
        return 0
    return want


def _is_ignorable(key: str, cfg: ModelConfig, fmt_mtp: int) -> bool:
    if key.endswith("rotary_emb.inv_freq"):  # buffers that old exports include
        return True
    parts = key.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2]) >= cfg.num_hidden_layers + fmt_mtp  # MTP layers we chose not to load
    return False


def check_tensors(path: str, plan: L.Plan, tensors: st.SafetensorsDir, cfg: ModelConfig, block=(128, 128)):
    """Raise one ValueError naming every missing, unexpected or mis-shaped tensor (headers only)."""
    missing = [k for k in plan.expected if k not in tensors]
    shapes = [f"{k}: expected {plan.expected[k]}, found {tensors.shape(k)}"
              for k in plan.expected if k in tensors and tuple(tensors.shape(k)) != tuple(plan.expected[k])]
    depth = len(plan.aliases) // 2
    missing += [k + st.SCALE_SUFFIX for k in plan.expected if k in tensors
                and tensors.tensors[k].dtype in st.FP8_DTYPES and k + st.SCALE_SUFFIX not in tensors]
    floats = ("F64", "F32", "F16", "BF16") + st.FP8_DTYPES
    kinds = [f"{k}: stored as {tensors.tensors[k].dtype}, the parameter needs floating point"
             for k in plan.expected if k in tensors and tensors.tensors[k].dtype not in floats]
    kinds += [f"{k}: stored as {tensors.tensors[k].dtype}, a scale must be F32/BF16/F16"
              for k in tensors.keys() if k.endswith(st.SCALE_SUFFIX) and tensors.tensors[k].dtype not in floats[:4]]
    extra, scales = [], []
    for k in tensors.keys():
        if k in plan.expected or _is_ignorable(k, cfg, depth):
            continue
        base = k[: -len(st.SCALE_SUFFIX)] if k.endswith(st.SCALE_SUFFIX) else None
        if base is not None and base in tensors and tensors.tensors[base].dtype in st.FP8_DTYPES:
            shape = tensors.shape(base)
            want = tuple(shape[:-2]) + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
            if tuple(tensors.shape(k)) != want:
                scales.append(f"{k}: expected {want} for {block[0]}x{block[1]} blocks of {tuple(shape)}, "
                              f"found {tensors.shape(k)}")
            continue
        extra.append(k)
    parts = []
    for title, items in (("missing", missing), ("wrong shape", shapes + scales), ("wrong dtype", kinds),
                         ("unexpected", extra)):
        if items:
            shown = "; ".join(items[:8]) + (f"; ... ({len(items)} in all)" if len(items) > 8 else "")
            parts.append(f"{title}: {shown}")
    if parts:
        raise UserError(f"checkpoint {path} does not match its config.json (num_hidden_layers="
                        f"{cfg.num_hidden_layers}, q_lora_rank={cfg.q_lora_rank}, MTP layers={depth}): "
                        + " | ".join(parts))
