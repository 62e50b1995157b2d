"""ModelConfig: the one frozen description of a DeepSeek-V3-style network.

Field names follow the released `config.json` (REFERENCE.md section 1) so that a Hugging Face config
maps onto this class key for key. The config is validated when it is constructed: every invalid
combination raises a `ValueError` that names the field and says how to fix it, before any array is
allocated or any function is compiled.

Derived sizes (head dims, number of MoE layers, ...) are properties, never stored twice.
ml-collections stays at the edge: `ModelConfig.from_dict(config.model)` turns the `model` section of a
`configs/*.py` ConfigDict into this class and rejects unknown keys.

What is NOT here: how the network runs (expert layout and block size, expert dispatch and capacity, FP8
GEMMs, remat, the pipeline). That is the `Runtime` (dsv3_jax/runtime.py); a config's `model` section
still carries the run keys users type (`model.moe_impl`, `model.fp8`, ...), and
`ModelConfig.from_dict` skips them (`runtime.split_model_section`) and `runtime.from_config` reads them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from dsv3_jax.cli import UserError
from dsv3_jax.runtime import split_model_section

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (REFERENCE.md section 2; the frequency blend is in rope.py). Defaults: DeepSeek-V3."""

    factor: float = 40.0  # target context / original context; the slowest channels' frequencies are divided by it
    original_max_position_embeddings: int = 4096  # L0, the context the model was pretrained on
    beta_fast: float = 32.0  # channels that turn more than beta_fast times in L0 keep their frequency
    beta_slow: float = 1.0  # channels that turn fewer than beta_slow times in L0 are fully interpolated
    mscale: float = 1.0  # cos/sin are scaled by yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    mscale_all_dim: float = 1.0  # softmax scale x yarn_mscale(factor, mscale_all_dim)^2; 0 = no such scaling
    type: str = "yarn"  # the only kind supported

    def __post_init__(self):
        if self.type != "yarn":
            raise UserError(f"rope_scaling.type={self.type!r} is not supported; use 'yarn' or set rope_scaling=None.")
        if self.factor < 1.0:
            raise UserError(f"rope_scaling.factor={self.factor} must be >= 1 (target context / original context).")
        if self.original_max_position_embeddings <= 0:
            raise UserError("rope_scaling.original_max_position_embeddings must be > 0.")
        if not self.beta_fast >= self.beta_slow > 0:  # (equal: Kimi-K2's 1 and 1, a one-channel ramp)
            raise UserError(
                f"rope_scaling needs beta_fast >= beta_slow > 0, got beta_fast={self.beta_fast}, "
                f"beta_slow={self.beta_slow} (DeepSeek-V3 uses 32 and 1)."
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every field that shapes the network. Defaults are the released DeepSeek-V3 (671B)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU layers
    moe_intermediate_size: int = 2048  # each routed expert; shared = this * n_shared_experts
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: queries projected directly (q_proj)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    num_nextn_predict_layers: int = 1  # MTP depth D
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = dataclasses.field(default_factory=RopeScaling)
    initializer_range: float = 0.006
    # DeepSeek Sparse Attention (V3.2, `dsa.py`): index_topk > 0 adds the lightning indexer to every layer and
    # each query attends only to the index_topk keys it scores highest; 0 is dense MLA (V3, V3.1, R1)
    index_topk: int = 0
    index_n_heads: int = 64
    index_head_dim: int = 128
    dtype: str = "bfloat16"  # activations / matmul inputs
    param_dtype: str = "float32"  # master weights

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            rs = dict(self.rope_scaling)
            if "rope_type" in rs:  # transformers >= 5 spelling of `type`
                rs.setdefault("type", rs.pop("rope_type"))
            known = {f.name for f in dataclasses.fields(RopeScaling)}
            unknown = sorted(set(rs) - known)
            if unknown:
                raise UserError(
                    f"ModelConfig.rope_scaling has unknown field(s) {unknown}; valid fields are {sorted(known)}."
                )
            object.__setattr__(self, "rope_scaling", RopeScaling(**rs))
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "max_position_embeddings",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"ModelConfig.{name}={getattr(self, name)} must be > 0.")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise UserError(
                f"ModelConfig.q_lora_rank={self.q_lora_rank} must be > 0, or None to project queries directly."
            )
        if self.qk_rope_head_dim % 2:
            raise UserError(
                f"ModelConfig.qk_rope_head_dim={self.qk_rope_head_dim} must be even: RoPE rotates pairs of channels."
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise UserError(
                f"ModelConfig.first_k_dense_replace={self.first_k_dense_replace} must be between 0 and "
                f"num_hidden_layers={self.num_hidden_layers}."
            )
        if self.num_nextn_predict_layers < 0:
            raise UserError("ModelConfig.num_nextn_predict_layers (MTP depth) must be >= 0.")
        if self.scoring_func != "sigmoid":
            raise UserError(f"ModelConfig.scoring_func={self.scoring_func!r}: only 'sigmoid' (DeepSeek-V3) is "
                            f"supported.")
        if self.dtype not in _DTYPES or self.param_dtype not in _DTYPES:
            raise UserError(
                f"ModelConfig.dtype={self.dtype!r} / param_dtype={self.param_dtype!r}: choose from {sorted(_DTYPES)}."
            )
        if self.index_topk < 0:
            raise UserError(f"ModelConfig.index_topk={self.index_topk} must be >= 0 (0: dense attention).")
        if self.dsa:
            if self.q_lora_rank is None:
                raise UserError("ModelConfig.index_topk > 0 (sparse attention) needs q_lora_rank: the indexer's "
                                "queries come from the query latent.")
            if self.index_n_heads <= 0 or self.index_head_dim < self.qk_rope_head_dim or self.index_head_dim % 2:
                raise UserError(f"ModelConfig.index_n_heads={self.index_n_heads} must be > 0 and index_head_dim="
                                f"{self.index_head_dim} even and >= qk_rope_head_dim={self.qk_rope_head_dim} (RoPE "
                                f"turns its first qk_rope_head_dim channels).")
        if self.has_moe:
            self._validate_moe()

    def _validate_moe(self):
        E, K = self.n_routed_experts, self.num_experts_per_tok
        if E <= 0 or K <= 0:
            raise UserError(
                f"ModelConfig.n_routed_experts={E} and num_experts_per_tok={K} must be > 0 when there are MoE "
                f"layers (first_k_dense_replace={self.first_k_dense_replace} < num_hidden_layers="
                f"{self.num_hidden_layers}); set first_k_dense_replace=num_hidden_layers for a dense model."
            )
        if K > E:
            raise UserError(
                f"ModelConfig.num_experts_per_tok={K} exceeds n_routed_experts={E}: lower top-k or add experts."
            )
        if self.n_shared_experts < 0:
            raise UserError("ModelConfig.n_shared_experts must be >= 0.")
        if self.n_group <= 0 or E % self.n_group:
            raise UserError(
                f"ModelConfig.n_group={self.n_group} must be > 0 and divide n_routed_experts={E}; "
                f"use a divisor of {E} (n_group=1 disables group-limited routing)."
            )
        if not 0 < self.topk_group <= self.n_group:
            raise UserError(
                f"ModelConfig.topk_group={self.topk_group} must be between 1 and n_group={self.n_group}."
            )
        per_group = E // self.n_group
        if self.n_group > 1 and per_group < 2 and self.topk_group < self.n_group:
            raise UserError(
                f"ModelConfig.n_group={self.n_group} leaves {per_group} expert per group; group scores sum the top-2 "
                f"experts of a group, so use n_group <= {E // 2}."
            )
        if self.topk_group * per_group < K:
            raise UserError(
                f"ModelConfig: topk_group={self.topk_group} groups of {per_group} experts hold fewer than "
                f"num_experts_per_tok={K} experts; raise topk_group or lower top-k."
            )
        if self.routed_scaling_factor <= 0:
            raise UserError("ModelConfig.routed_scaling_factor must be > 0.")

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers

    @property
    def dsa(self) -> bool:
        """DeepSeek Sparse Attention (V3.2): the indexer and top-k attention in every layer."""
        return self.index_topk > 0

    @property
    def cache_rope_width(self) -> int:
        """Channels of a cached token's k_pe entry: the roped shared key (qk_rope_head_dim), and with sparse
        attention the indexer's key (index_head_dim) beside it (`mla.LatentCache`, `infer.paged_cache`)."""
        return self.qk_rope_head_dim + (self.index_head_dim if self.dsa else 0)

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    @property
    def softmax_scale(self) -> float:
        """(dn + dr)^-0.5, times mscale^2 under YaRN (REFERENCE.md section 2)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def latent_cache_values_per_token(self) -> int:
        """Values per token per layer in the absorbed-MLA cache: kv_lora_rank + qk_rope_head_dim (576 in V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping (e.g. `config.model` of an ml-collections ConfigDict); unknown keys are errors.
        The run keys a config's model section also carries (`runtime.MODEL_RUN_KEYS`: moe_impl, fp8, ...)
        are skipped here: they describe how the model runs, and `runtime.from_config` reads them."""
        d, _ = split_model_section(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(
                f"Unknown ModelConfig field(s) {unknown}; valid fields are: {sorted(known)}."
            )
        rs = d.get("rope_scaling")
        if rs is not None and not isinstance(rs, RopeScaling):
            rs = dict(rs)
            if not rs:  # an empty dict in a ConfigDict means "no scaling"
                rs = None
            d["rope_scaling"] = rs
        return cls(**d)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0
