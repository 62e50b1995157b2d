"""config.json <-> ModelConfig: the released DeepSeek-V3 config in Hugging Face's spelling.

    from dsv3_jax.interop import hf
    cfg = hf.config_from_hf(hf.read_config("DeepSeek-V3/"))     # -> ModelConfig
    d = hf.config_to_hf(cfg, torch_dtype="bfloat16")             # -> dict for config.json

`parse_config` returns an `HFConfig`: the ModelConfig plus what says how the checkpoint stores its
tensors (RoPE row order, FP8 block size) and the bos/eos ids. The names are re-exported by `hf.py`,
the interop's front door; the checkpoint reader (hf_checkpoint.py) uses them from here.

Our field names are the HF ones; what differs:
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
    ours in max_position_embeddings (4096), initializer_range (0.02) and RoPE (none). The fields that
    shape the network (sizes, ranks, routing) have no safe default: config.json must state them.

`config_to_hf` writes the release's spelling (`rope_theta` + `rope_scaling`), which transformers 4
and 5 both read, and which `config_from_hf` maps back to the same ModelConfig (dtypes aside: config.json
records neither of ours).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig, RopeScaling, yarn_mscale

CONFIG_FILE = "config.json"

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
# DeepSeek-V3.2 (model_type deepseek_v32: sparse attention, `dsa.py`): the indexer's fields, all required there
_DSA = ("index_topk", "index_n_heads", "index_head_dim")
# model types whose checkpoints are DeepSeek-V3's architecture (Kimi-K2 ships its configs as kimi_k2, with
# DeepseekV3ForCausalLM as the architecture; Moonlight, V3.1 and R1 as deepseek_v3)
_MODEL_TYPES = {"deepseek_v3": "DeepseekV3ForCausalLM", "kimi_k2": "DeepseekV3ForCausalLM",
                "deepseek_v32": "DeepseekV32ForCausalLM"}
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
            "num_mtp_layers", "rope_theta", "rope_scaling", "rope_parameters", "mlp_layer_types", "layer_types",
            "mlp_bias"}


@dataclasses.dataclass(frozen=True)
class HFConfig:
    """A parsed config.json: the ModelConfig plus how its checkpoint stores tensors."""

    model: ModelConfig
    rope_interleave: bool = True
    fp8_block: tuple[int, int] | None = None  # weight_block_size when quantization_config says fp8
    bos_token_id: int | None = 0
    eos_token_id: Any = 1
    # a multimodal wrapper's language model (Mistral-Large-3: model_type mistral3 around a deepseek_v3 text_config):
    # its tensors sit under one of these prefixes, and the other towers' tensors (skipped) under those
    text_prefixes: tuple[str, ...] = ()
    skipped_prefixes: tuple[str, ...] = ()


def config_from_hf(d: Mapping[str, Any], **overrides) -> ModelConfig:
    """config.json (as a dict) -> ModelConfig; `overrides` set our own fields (dtype, param_dtype, ...)."""
    return parse_config(d, **overrides).model


# Multimodal wrappers whose language model is a DeepSeek-V3 (`text_config`): the wrapper's own fields (the vision
# tower's config, the projector's options) and where transformers saves the text model's tensors (the old and the
# new naming) and the other towers'.
_WRAPPERS = {"mistral3": {"fields": {"vision_config", "image_token_index", "image_token_id", "projector_hidden_act",
                                     "multimodal_projector_bias", "spatial_merge_size", "vision_feature_layer",
                                     "text_config"},
                          "text": ("language_model.model.", "model.language_model.", "language_model."),
                          "skipped": ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                      "model.multi_modal_projector.")}}


def parse_config(d: Mapping[str, Any], **overrides) -> HFConfig:
    """config.json (as a dict) -> HFConfig; raises a UserError naming the field for anything we cannot load."""
    d = dict(d)
    if d.get("model_type") in _WRAPPERS:
        return _parse_wrapper(d, **overrides)
    if "num_mtp_layers" in d:  # transformers 5 alias
        mtp = d.pop("num_mtp_layers")
        if d.setdefault("num_nextn_predict_layers", mtp) != mtp:
            raise UserError(f"config.json: num_mtp_layers={mtp} but num_nextn_predict_layers="
                            f"{d['num_nextn_predict_layers']}; they name the same thing")
    model_type = d.get("model_type", "deepseek_v3")
    if model_type not in _MODEL_TYPES:
        raise UserError(f"config.json: model_type={model_type!r}; dsv3_jax reads {sorted(_MODEL_TYPES)}")
    dsa = model_type == "deepseek_v32"
    unknown = sorted(set(d) - set(_SAME) - _IGNORED - _CHECKED - (set(_DSA) if dsa else set()))
    if unknown:
        raise UserError(f"config.json: unknown field(s) {unknown}; dsv3_jax reads DeepSeek-V3 configs "
                        f"(model_type deepseek_v3; deepseek_v32 adds {', '.join(_DSA)}). Remove them or extend "
                        f"dsv3_jax.interop.hf_config if they matter.")
    absent = [k for k in _REQUIRED + (_DSA if dsa else ()) if k not in d]
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
    if dsa:
        fields.update({k: d[k] for k in _DSA})
        if int(d["index_topk"]) <= 0:
            raise UserError(f"config.json: index_topk={d['index_topk']!r} must be > 0 for model_type deepseek_v32")
    fields.update(rope_theta=theta, rope_scaling=scaling, **overrides)
    try:
        cfg = ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"config.json: {e}") from None
    _check_hf_only(d, cfg)
    return HFConfig(cfg, rope_interleave=bool(d.get("rope_interleave", True)), fp8_block=_fp8_block(d),
                    bos_token_id=d.get("bos_token_id", 0), eos_token_id=d.get("eos_token_id", 1))


def _parse_wrapper(d: dict, **overrides) -> HFConfig:
    """A multimodal wrapper (Mistral-Large-3's `mistral3`): its DeepSeek-V3 `text_config` is the model; the vision
    tower and the projector are not loaded (hf.load says so in one line)."""
    kind = d["model_type"]
    w = _WRAPPERS[kind]
    text = d.get("text_config")
    if not isinstance(text, Mapping) or text.get("model_type") not in ("deepseek_v3", "deepseek_v32"):
        got = text.get("model_type") if isinstance(text, Mapping) else text
        raise UserError(f"config.json: model_type {kind!r} wraps a text_config of model_type {got!r}; dsv3_jax reads "
                        f"one whose language model is a DeepSeek-V3 (text_config.model_type deepseek_v3)")
    unknown = sorted(set(d) - w["fields"] - _IGNORED - {"tie_word_embeddings", "quantization_config"})
    if unknown:
        raise UserError(f"config.json: unknown field(s) {unknown} of a {kind} config; dsv3_jax reads its text_config "
                        f"and skips {sorted(w['fields'] - {'text_config'})}")
    inner = dict(text)
    if d.get("tie_word_embeddings") and not inner.get("tie_word_embeddings", False):
        inner["tie_word_embeddings"] = True  # the wrapper's tie applies to its language model's head
    if "quantization_config" in d:
        inner.setdefault("quantization_config", d["quantization_config"])
    for k in ("bos_token_id", "eos_token_id"):
        if k in d and k not in inner:
            inner[k] = d[k]
    hfc = parse_config(inner, **overrides)
    return dataclasses.replace(hfc, text_prefixes=w["text"], skipped_prefixes=w["skipped"])


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
    if d.get("mlp_bias", False):
        bad("mlp_bias", "the MLPs have no biases")
    mlp = d.get("mlp_layer_types")
    want = ["dense"] * cfg.first_k_dense_replace + ["sparse"] * (cfg.num_hidden_layers - cfg.first_k_dense_replace)
    if mlp is not None and list(mlp) != want:
        bad("mlp_layer_types", f"first_k_dense_replace={cfg.first_k_dense_replace} dense layers, then MoE ('sparse')")
    layers = d.get("layer_types")
    kind = "indexed_attention" if cfg.dsa else "full_attention"
    if layers is not None and any(t != kind for t in layers):
        bad("layer_types", f"every layer is {kind!r} in this model_type")


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
    model_type = "deepseek_v32" if cfg.dsa else "deepseek_v3"
    d = {"architectures": [_MODEL_TYPES[model_type]], "model_type": model_type}
    d.update({k: getattr(cfg, k) for k in _SAME + (_DSA if cfg.dsa else ())})
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
    """DIR/config.json as a dict, with a clear error for a missing directory, file or malformed JSON."""
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
