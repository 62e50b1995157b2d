"""ModelConfig validation: every invalid combination raises a ValueError naming the field; derived
values (softmax scale, shared width, layer split) against hand-computed numbers."""
import dataclasses
import math

import pytest

from dsv3_jax.config import ModelConfig, RopeScaling

# A small valid MoE config that each bad case perturbs by one or two fields.
BASE = dict(
    vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=3,
    num_attention_heads=2, q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=6,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    first_k_dense_replace=1, num_nextn_predict_layers=1, dtype="float32",
)


def test_base_is_valid():
    cfg = ModelConfig(**BASE)
    assert cfg.num_dense_layers == 1 and cfg.num_moe_layers == 2 and cfg.has_moe
    assert cfg.qk_head_dim == 8
    assert cfg.shared_intermediate_size == 8


BAD = [
    # (overrides, field that the message must name)
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),  # top-k > experts
    (dict(n_group=3), "n_group"),  # 3 does not divide 8
    (dict(n_group=0), "n_group"),
    (dict(n_group=8, topk_group=4), "n_group"),  # one expert per group: top-2 group score impossible
    (dict(topk_group=5), "topk_group"),  # > n_group
    (dict(topk_group=0), "topk_group"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group"),  # 1 group of 2 < top-3
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),  # odd rope dim
    (dict(qk_rope_head_dim=0), "qk_rope_head_dim"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(num_attention_heads=-2), "num_attention_heads"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(qk_nope_head_dim=0), "qk_nope_head_dim"),
    (dict(v_head_dim=0), "v_head_dim"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(n_routed_experts=0), "n_routed_experts"),  # MoE layers exist but no experts
    (dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(dtype="int8"), "dtype"),
    (dict(param_dtype="float64"), "param_dtype"),
    (dict(rope_scaling=dict(type="linear")), "rope_scaling.type"),
    (dict(rope_scaling=dict(factor=0.5)), "rope_scaling.factor"),
    (dict(rope_scaling=dict(beta_fast=1.0, beta_slow=2.0)), "beta_fast"),
    (dict(rope_scaling=dict(original_max_position_embeddings=0)), "original_max_position_embeddings"),
]


@pytest.mark.parametrize("overrides, field", BAD, ids=[f"{f}:{o}" for o, f in BAD])
def test_invalid_config_raises_naming_field(overrides, field):
    with pytest.raises(ValueError) as err:
        ModelConfig(**{**BASE, **overrides})
    assert field in str(err.value), str(err.value)


def test_dense_only_model_needs_no_experts():
    # No MoE layer: expert fields are not validated (n_routed_experts=0 is fine).
    cfg = ModelConfig(**{**BASE, "first_k_dense_replace": 3, "n_routed_experts": 0, "num_experts_per_tok": 0})
    assert not cfg.has_moe and cfg.num_moe_layers == 0


def test_q_lora_rank_none_accepted():
    cfg = ModelConfig(**{**BASE, "q_lora_rank": None})
    assert cfg.q_lora_rank is None


def test_group_limit_boundaries_accepted():
    # topk_group == n_group (no limiting) and n_group == 1 are both valid.
    assert ModelConfig(**{**BASE, "topk_group": 4}).topk_group == 4
    assert ModelConfig(**{**BASE, "n_group": 1, "topk_group": 1}).n_group == 1
    # topk_group * experts-per-group == top-k exactly is enough.
    assert ModelConfig(**{**BASE, "n_group": 4, "topk_group": 1, "num_experts_per_tok": 2}).topk_group == 1


def test_from_dict_unknown_field_named():
    with pytest.raises(ValueError, match="bogus_width"):
        ModelConfig.from_dict({**BASE, "bogus_width": 3})


def test_from_dict_rope_scaling_dict_and_empty():
    cfg = ModelConfig.from_dict({**BASE, "rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 512}})
    assert isinstance(cfg.rope_scaling, RopeScaling)
    assert cfg.rope_scaling == RopeScaling(factor=8.0, original_max_position_embeddings=512)
    assert cfg.rope_scaling.beta_fast == 32.0 and cfg.rope_scaling.beta_slow == 1.0  # defaults kept
    assert ModelConfig.from_dict({**BASE, "rope_scaling": {}}).rope_scaling is None
    assert ModelConfig.from_dict({**BASE, "rope_scaling": None}).rope_scaling is None
    # A ConfigDict (anything with to_dict) goes through the same path.
    ml_collections = pytest.importorskip("ml_collections")
    cd = ml_collections.ConfigDict({**BASE, "rope_scaling": {"factor": 2.0}})
    assert ModelConfig.from_dict(cd).rope_scaling.factor == 2.0


@pytest.mark.parametrize("build", ["ctor", "from_dict"])
def test_rope_scaling_unknown_key_is_value_error(build):
    d = {**BASE, "rope_scaling": {"factor": 4.0, "bogus_beta": 2.0}}
    with pytest.raises(ValueError, match="bogus_beta"):
        ModelConfig(**d) if build == "ctor" else ModelConfig.from_dict(d)


def test_constructor_converts_rope_scaling_dict():
    cfg = ModelConfig(**{**BASE, "rope_scaling": {"factor": 4.0, "mscale_all_dim": 0.5}})
    assert cfg.rope_scaling == RopeScaling(factor=4.0, mscale_all_dim=0.5)


def test_v3_defaults_and_softmax_scale():
    cfg = ModelConfig()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (7168, 61, 256, 8)
    assert cfg.num_dense_layers == 3 and cfg.num_moe_layers == 58
    assert cfg.latent_cache_values_per_token() == 576
    # Hand value: (128 + 64)^-0.5 * (0.1 * ln 40 + 1)^2.
    hand = (192 ** -0.5) * (0.1 * math.log(40.0) + 1.0) ** 2
    assert cfg.softmax_scale == pytest.approx(hand, rel=1e-12)
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=5e-8)
    # Without YaRN the scale is the plain (dn + dr)^-0.5.
    assert cfg.replace(rope_scaling=None).softmax_scale == pytest.approx(192 ** -0.5, rel=1e-12)
    # mscale_all_dim enters squared: 0.1 * 0.5 * ln 40 + 1.
    half = cfg.replace(rope_scaling=RopeScaling(mscale_all_dim=0.5)).softmax_scale
    assert half == pytest.approx((192 ** -0.5) * (0.05 * math.log(40.0) + 1.0) ** 2, rel=1e-12)


def test_config_is_frozen():
    cfg = ModelConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 32  # type: ignore[misc]
    assert cfg.replace(hidden_size=32).hidden_size == 32 and cfg.hidden_size == 16
