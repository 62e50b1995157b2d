"""Load and save the released DeepSeek-V3 checkpoint format (Hugging Face safetensors, BF16/FP32 or FP8).

    from dsv3_jax.interop import hf
    config, model = hf.load("DeepSeek-V3/", dtype=jnp.bfloat16)   # -> ModelConfig, DeepSeekV3
    logits = model(tokens).logits
    hf.save(model, config, "out/")            # transformers' DeepseekV3ForCausalLM.from_pretrained reads it
    tokenizer = hf.load_tokenizer("DeepSeek-V3/")

A directory holds `config.json`, `model.safetensors` or shards `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, and usually `tokenizer.json` (REFERENCE.md section 5).

config.json -> ModelConfig (`config_from_hf`). Our field names are the HF ones; what differs:
  * RoPE comes in two spellings: `rope_theta` + `rope_scaling` {type, factor, ...} (the release,
    transformers 4) or `rope_parameters` {rope_type, rope_theta, factor, ...} (transformers 5). Both
    map to `rope_theta` + `RopeScaling`, with transformers' defaults for absent fields (factor =
    max_position_embeddings / original_max_position_embeddings, beta_fast 32, beta_slow 1). YaRN's
    two temperatures follow transformers exactly: cos/sin are scaled by
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set, else by
    mscale(factor, 1), and the softmax by mscale(factor, mscale_all_dim)^2 when mscale_all_dim is
    set. "Not set" is stored as mscale_all_dim = 0 (and mscale = 1).
  * HF-only fields are checked against the model rather than stored: `head_dim` (must be
    qk_rope_head_dim), `qk_head_dim`, `num_key_value_heads` (MLA has no grouped heads: must equal
    num_attention_heads), `hidden_act` (silu), `tie_word_embeddings` (false), `attention_bias`
    (false), `topk_method` (noaux_tc), `moe_layer_freq` (1), `rope_interleave` (either: see
    layout.py), `quantization_config` (fp8 e4m3 blocks). Bookkeeping fields (`architectures`,
    `model_type`, bos/eos ids, dtypes, ...) are ignored. Any other field is an error naming it.
  * Fields missing from config.json take transformers' DeepseekV3Config defaults, which differ from
    ours in max_position_embeddings (4096), initializer_range (0.02) and RoPE (none).

Weights: `layout.py` says which tensor fills which slice of which parameter. `load` checks the whole
checkpoint against that plan from the safetensors headers alone (missing, unexpected and mis-shaped
tensors raise one error naming them) before it reads any data, then reads tensor by tensor, FP8
dequantised with its 128x128 `weight_scale_inv` blocks (safetensors_io.py), or with `keep_fp8=True` kept
as the e4m3 blocks and their scales (FP8-resident weights, dsv3_jax/fp8/resident.py). The MTP layer
(`model.layers.{num_hidden_layers}`) is loaded when present; transformers' `save_pretrained` drops it,
so `mtp="auto"` loads a directory without it as a model without MTP (with a warning).

`save` writes config.json in the release's spelling (`rope_scaling`), per-expert tensors in [out, in]
layout, the MTP layers with their `embed_tokens` / `shared_head.head` copies, optionally FP8 weights
with scales, and tokenizer.json when given a tokenizer.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import runtime as runtime_lib
from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig, RopeScaling, yarn_mscale
from dsv3_jax.fp8.quant import quantize_blocks
from dsv3_jax.fp8.resident import quantize_weight
from dsv3_jax.interop import layout as L
from dsv3_jax.interop import safetensors_io as st
from dsv3_jax.io import tokenizer as tokenizer_io
from dsv3_jax.model import DeepSeekV3
from dsv3_jax.moe import RouterBias
from dsv3_jax.runtime import Runtime

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TOKENIZER_FILE = tokenizer_io.TOKENIZER_FILENAME

# ModelConfig fields that config.json spells the same way (rope handled separately).
_SAME = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
    "routed_scaling_factor", "scoring_func", "norm_topk_prob", "first_k_dense_replace", "num_nextn_predict_layers",
    "rms_norm_eps", "max_position_embeddings", "initializer_range",
)
# Fields that shape the network (tensor shapes, routing): config.json must state them; a default
# (ours or transformers') would load a different network without a word.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_REQUIRED_MOE = ("n_routed_experts", "moe_intermediate_size", "n_shared_experts", "num_experts_per_tok",
                 "first_k_dense_replace", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob")
# transformers' DeepseekV3Config defaults where a field is absent from config.json (only those that
# differ from ModelConfig's).
_HF_DEFAULTS = {"max_position_embeddings": 4096, "initializer_range": 0.02}
# Fields with no effect on the network's function (bookkeeping, generation, training-only options).
_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "auto_map", "attention_dropout", "pretraining_tp",
    "output_router_logits", "aux_loss_alpha", "seq_aux", "ep_size", "_name_or_path", "name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "tokenizer_class", "task_specific_params", "chunk_size_feed_forward", "is_encoder_decoder",
    "_attn_implementation_autoset", "num_labels", "use_return_dict", "router_aux_loss_coef",
}
# HF-only fields checked against the model (see `_check_hf_only`).
_CHECKED = {"head_dim", "qk_head_dim", "num_key_value_heads", "hidden_act", "tie_word_embeddings",
            "attention_bias", "topk_method", "moe_layer_freq", "rope_interleave", "quantization_config",
            "num_mtp_layers", "rope_theta", "rope_scaling", "rope_parameters"}


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """A parsed config.json: the ModelConfig plus how its checkpoint stores tensors."""

    model: ModelConfig
    rope_interleave: bool = True
    fp8_block: tuple[int, int] | None = None  # weight_block_size when quantization_config says fp8
    bos_token_id: int | None = 0
    eos_token_id: Any = 1


# ---------------------------------------------------------------------- config.json

def config_from_hf(d: Mapping[str, Any], **overrides) -> ModelConfig:
    """config.json (as a dict) -> ModelConfig; `overrides` set our own fields (dtype, param_dtype, ...)."""
    return parse_config(d, **overrides).model


def parse_config(d: Mapping[str, Any], **overrides) -> HFConfig:
    d = dict(d)
    if "num_mtp_layers" in d:  # transformers 5 alias
        mtp = d.pop("num_mtp_layers")
        if d.setdefault("num_nextn_predict_layers", mtp) != mtp:
            raise UserError(f"config.json: num_mtp_layers={mtp} but num_nextn_predict_layers="
                            f"{d['num_nextn_predict_layers']}; they name the same thing")
    unknown = sorted(set(d) - set(_SAME) - _IGNORED - _CHECKED)
    if unknown:
        raise UserError(f"config.json: unknown field(s) {unknown}; dsv3_jax reads DeepSeek-V3 configs "
                        f"(model_type deepseek_v3). Remove them or extend dsv3_jax.interop.hf if they matter.")
    if d.get("model_type", "deepseek_v3") != "deepseek_v3":
        raise UserError(f"config.json: model_type={d['model_type']!r} is not 'deepseek_v3'")
    absent = [k for k in _REQUIRED if k not in d]
    if d.get("n_routed_experts"):
        absent += [k for k in _REQUIRED_MOE if k not in d]
    if absent:
        raise UserError(f"config.json: missing {', '.join(absent)}: these fields shape the network and have no safe "
                        f"default; copy them from the model's original config.json")
    fields = {k: d.get(k, _HF_DEFAULTS.get(k)) for k in _SAME if k in d or k in _HF_DEFAULTS}
    for k in ("n_group", "topk_group"):  # transformers allows None for "no groups"
        if k in fields and fields[k] is None:
            fields[k] = 1
    if fields.get("scoring_func", "sigmoid") != "sigmoid":
        raise UserError(f"config.json: scoring_func={fields['scoring_func']!r}; DeepSeek-V3 routing needs 'sigmoid'")
    theta, scaling = _parse_rope(d, fields.get("max_position_embeddings", ModelConfig.max_position_embeddings))
    fields.update(rope_theta=theta, rope_scaling=scaling, **overrides)
    try:
        cfg = ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"config.json: {e}") from None
    _check_hf_only(d, cfg)
    return HFConfig(cfg, rope_interleave=bool(d.get("rope_interleave", True)), fp8_block=_fp8_block(d),
                    bos_token_id=d.get("bos_token_id", 0), eos_token_id=d.get("eos_token_id", 1))


def _parse_rope(d: dict, max_pos: int) -> tuple[float, RopeScaling | None]:
    top_theta = d.get("rope_theta")
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if params is not None and scaling is not None:
        a = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type")}
        b = {k: v for k, v in scaling.items() if k not in ("rope_theta", "rope_type", "type")}
        if a != b:
            raise UserError(f"config.json: rope_parameters {params} and rope_scaling {scaling} disagree; keep one")
    rp = dict(params if params is not None else (scaling or {}))
    theta = rp.pop("rope_theta", None)
    if theta is not None and top_theta is not None and float(theta) != float(top_theta):
        raise UserError(f"config.json: rope_theta={top_theta} but rope_parameters.rope_theta={theta}")
    theta = float(theta if theta is not None else (top_theta if top_theta is not None else 10000.0))
    kind = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("type", None)
    if kind == "default":
        if rp.get("factor", 1.0) not in (None, 1.0):
            raise UserError(f"config.json: rope type 'default' with factor={rp['factor']}")
        return theta, None
    if kind != "yarn":
        raise UserError(f"config.json: rope_scaling type {kind!r} is not supported; DeepSeek-V3 uses 'yarn'")
    known = {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate", "partial_rotary_factor"}
    unknown = sorted(set(rp) - known)
    if unknown:
        raise UserError(f"config.json: unknown rope_scaling field(s) {unknown}")
    if rp.get("truncate", True) is not True:
        raise UserError("config.json: rope_scaling.truncate=false is not supported (YaRN bounds are floored/ceiled)")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError("config.json: rope_scaling.partial_rotary_factor != 1 is not supported")
    L0 = int(rp.get("original_max_position_embeddings") or max_pos)
    factor = float(rp["factor"]) if rp.get("factor") is not None else max_pos / L0
    ms, ma = rp.get("mscale"), rp.get("mscale_all_dim")
    if ms and ma:
        mscale, mscale_all_dim = float(ms), float(ma)
    elif not ma:  # transformers: cos/sin x mscale(factor), softmax unscaled
        mscale, mscale_all_dim = 1.0, 0.0
    else:
        raise UserError(f"config.json: rope_scaling has mscale_all_dim={ma} without mscale; set both (DeepSeek-V3: "
                        f"1.0 and 1.0)")
    try:
        rs = RopeScaling(factor=factor, original_max_position_embeddings=L0,
                         beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
                         mscale=mscale, mscale_all_dim=mscale_all_dim)
    except ValueError as e:
        raise UserError(f"config.json: {e}") from None
    if rp.get("attention_factor") is not None:
        ours = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        if not math.isclose(float(rp["attention_factor"]), ours, rel_tol=1e-6):
            raise UserError(f"config.json: rope_scaling.attention_factor={rp['attention_factor']} differs from the "
                            f"value {ours:.6g} implied by factor/mscale/mscale_all_dim; not supported")
    return theta, rs


def _check_hf_only(d: dict, cfg: ModelConfig):
    def bad(field, want):
        raise UserError(f"config.json: {field}={d[field]!r} is inconsistent with this model: {want}")

    if d.get("head_dim") is not None and d["head_dim"] != cfg.qk_rope_head_dim:
        bad("head_dim", f"transformers sets it to qk_rope_head_dim={cfg.qk_rope_head_dim}")
    if d.get("qk_head_dim") is not None and d["qk_head_dim"] != cfg.qk_head_dim:
        bad("qk_head_dim", f"must be qk_nope_head_dim + qk_rope_head_dim = {cfg.qk_head_dim}")
    if d.get("num_key_value_heads") not in (None, cfg.num_attention_heads):
        bad("num_key_value_heads", f"MLA has no grouped heads; it must equal num_attention_heads="
            f"{cfg.num_attention_heads}")
    if d.get("hidden_act", "silu") != "silu":
        bad("hidden_act", "DeepSeek-V3 uses 'silu' (SwiGLU)")
    if d.get("tie_word_embeddings", False):
        bad("tie_word_embeddings", "DeepSeek-V3 has an untied lm_head")
    if d.get("attention_bias", False):
        bad("attention_bias", "projections have no biases")
    if d.get("topk_method", "noaux_tc") != "noaux_tc":
        bad("topk_method", "only 'noaux_tc' (sigmoid scores, bias-corrected group top-k) is implemented")
    if d.get("moe_layer_freq", 1) != 1:
        bad("moe_layer_freq", "every layer after first_k_dense_replace is MoE")


def _fp8_block(d: dict) -> tuple[int, int] | None:
    q = d.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8":
        raise UserError(f"config.json: quantization_config.quant_method={q.get('quant_method')!r}; only 'fp8' "
                        f"(block-scaled E4M3) is supported")
    if q.get("fmt", "e4m3") != "e4m3":
        raise UserError(f"config.json: quantization_config.fmt={q['fmt']!r}; only 'e4m3' is supported")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2):
        raise UserError(f"config.json: quantization_config.weight_block_size={block!r} must be [rows, cols]")
    return int(block[0]), int(block[1])


def config_to_hf(cfg: ModelConfig, *, torch_dtype: str = "float32", fp8_block=None, bos_token_id=0,
                 eos_token_id=1) -> dict:
    """ModelConfig -> config.json dict in the release's spelling (rope_theta + rope_scaling)."""
    d = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    d.update({k: getattr(cfg, k) for k in _SAME})
    rs = cfg.rope_scaling
    d.update(
        rope_theta=cfg.rope_theta,
        rope_scaling=None if rs is None else {
            "type": "yarn", "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings, "beta_fast": rs.beta_fast,
            "beta_slow": rs.beta_slow, "mscale": rs.mscale, "mscale_all_dim": rs.mscale_all_dim},
        num_key_value_heads=cfg.num_attention_heads, hidden_act="silu", tie_word_embeddings=False,
        attention_bias=False, topk_method="noaux_tc", moe_layer_freq=1, rope_interleave=True,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, torch_dtype=torch_dtype, use_cache=True,
    )
    if fp8_block is not None:
        d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": list(fp8_block)}
    return d


def read_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a directory; pass a released-format (Hugging Face) checkpoint directory")
    f = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not a Hugging Face checkpoint directory")
    try:
        with open(f, encoding="utf-8") as fh:
            d = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f}: not valid JSON ({e}); restore the file from the checkpoint's source") from None
    if not isinstance(d, dict):
        raise UserError(f"{f}: expected a JSON object of config fields, got {type(d).__name__}")
    return d


# ---------------------------------------------------------------------- opening a checkpoint

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
         fp8_block=(128, 128), mtp: bool = True, tokenizer=None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write `model` as a released-format directory at `path`; returns the safetensors file names.

    dtype: tensor dtype on disk (default: the model's parameter dtype). fp8: store projection weights
    (attention, dense MLP, routed and shared experts) as F8_E4M3 with `weight_scale_inv` 128x128 blocks,
    the rest in `dtype` (router bias always float32). mtp: include the MTP layers (with the
    `embed_tokens` / `shared_head.head` copies the release carries). tokenizer: a `tokenizers.Tokenizer`
    to write as tokenizer.json.
    """
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
        tokenizer.save(os.path.join(path, TOKENIZER_FILE))
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

    f = path if path.endswith(".json") else os.path.join(path, TOKENIZER_FILE)
    return tokenizer_io.load_tokenizer(f, what=f"the checkpoint's {TOKENIZER_FILE}")


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy tokenizer.json (and tokenizer_config.json when present) from src to dst."""
    copied = []
    for name in (TOKENIZER_FILE, "tokenizer_config.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied
