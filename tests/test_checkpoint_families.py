"""The DeepSeek-V3-architecture checkpoints people run besides V3 itself, against transformers 5.25's
DeepseekV3ForCausalLM (PyTorch, CPU, float32): tiny random checkpoints in the shapes of Kimi-K2 (one expert group,
first_k_dense_replace 1, many experts) and Moonlight-16B-A3B (queries projected directly: q_lora_rank null, two
shared experts, no RoPE scaling), saved with `save_pretrained`, loaded with `hf.load`, logits compared;
Mistral-Large-3's form (transformers' Mistral3ForConditionalGeneration: a Pixtral vision tower around a deepseek_v3
`text_config`, the language model's tensors under `language_model.`), whose text logits we match with the vision
tower left unloaded;
and config.json in each model's released form (Kimi-K2's model_type kimi_k2 with its auto_map and training-only
fields; Moonlight's; DeepSeek-V3.1's and R1's are V3's) parses to the network it describes."""
import pytest
from test_interop import hf_model, max_diff, our_logits, ref, tokens_for, torch_logits  # noqa: F401

from dsv3_jax.cli import UserError
from dsv3_jax.interop import hf
from dsv3_jax.interop.hf_config import parse_config

TOL = 1e-4
SHAPES = {  # the released configs' structure at tiny widths
    "kimi_k2": dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=24,
                    n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=1,
                    routed_scaling_factor=2.827, max_position_embeddings=128,
                    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                  "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "moonlight": dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=12,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                      n_shared_experts=2, num_experts_per_tok=3, n_group=1, topk_group=1, first_k_dense_replace=1,
                      routed_scaling_factor=2.446, max_position_embeddings=128, rope_scaling=None),
}


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_family_logits_match_transformers(ref, tmp_path, family):  # noqa: F811
    cfg_dict = SHAPES[family]
    model = hf_model(ref, cfg_dict, seed=11)
    model.save_pretrained(tmp_path)
    tokens = tokens_for(cfg_dict["vocab_size"], seed=12)
    cfg, ours = hf.load(str(tmp_path))
    assert (cfg.n_group, cfg.topk_group, cfg.q_lora_rank) == (1, 1, cfg_dict["q_lora_rank"])
    assert max_diff(our_logits(ours, tokens)[0], torch_logits(model, tokens)) <= TOL


# config.json as each model ships it (fields and spellings of the released files; sizes as released)
KIMI_K2 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 0, "num_attention_heads": 64,
    "num_key_value_heads": 64, "n_shared_experts": 1, "n_routed_experts": 384, "ep_size": 1,
    "routed_scaling_factor": 2.827, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
    "pad_token_id": 163839, "bos_token_id": 163584, "eos_token_id": 163585, "pretraining_tp": 1,
    "tie_word_embeddings": False, "rope_theta": 50000.0,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "bfloat16", "transformers_version": "4.48.3",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
MOONLIGHT = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 163840,
    "hidden_size": 2048, "intermediate_size": 11264, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "ep_size": 1, "routed_scaling_factor": 2.446, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 8192, "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True,
    "bos_token_id": 163584, "eos_token_id": 163585, "pretraining_tp": 1, "tie_word_embeddings": False,
    "rope_theta": 50000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
}


def test_released_configs_parse_to_their_networks():
    kimi = parse_config(KIMI_K2)
    m = kimi.model
    assert (m.n_routed_experts, m.n_group, m.topk_group, m.first_k_dense_replace) == (384, 1, 1, 1)
    assert m.num_attention_heads == 64 and m.rope_scaling.factor == 32.0 and kimi.fp8_block == (128, 128)
    assert m.num_nextn_predict_layers == 0 and not m.dsa and kimi.eos_token_id == 163585
    moon = parse_config(MOONLIGHT).model
    assert moon.q_lora_rank is None and moon.rope_scaling is None and moon.n_shared_experts == 2
    assert moon.rms_norm_eps == 1e-05 and moon.num_experts_per_tok == 6
    for bad, match in ((dict(KIMI_K2, model_type="kimi_linear"), "model_type"),
                       (dict(KIMI_K2, scoring_func="softmax"), "scoring_func"),
                       (dict(MOONLIGHT, topk_method="greedy"), "topk_method"),
                       ({k: v for k, v in KIMI_K2.items() if k != "n_group"}, "n_group")):
        with pytest.raises(UserError, match=match):
            parse_config(bad)


def test_mistral_large_3_form_loads_its_language_model(ref, tmp_path, caplog):  # noqa: F811
    """A tiny random Mistral3ForConditionalGeneration whose text model is DeepSeek-V3-shaped, saved by transformers:
    its text-only logits (no image) equal ours, the vision tower and projector are skipped with one warning, and a
    wrapper around anything but a DeepSeek-V3 is refused naming text_config.model_type."""
    import torch  # noqa: F401

    text = ref.DeepseekV3Config(**SHAPES["kimi_k2"] | dict(num_hidden_layers=2, rope_scaling=None),
                                attn_implementation="eager")
    vision = ref.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, head_dim=8, image_size=32, patch_size=16)
    config = ref.Mistral3Config(vision_config=vision, text_config=text, tie_word_embeddings=False)
    from test_interop import randomize

    model = randomize(ref.Mistral3ForConditionalGeneration(config), 21).eval()
    model.save_pretrained(tmp_path)
    tokens = tokens_for(text.vocab_size, seed=22)
    with caplog.at_level("WARNING"):
        cfg, ours = hf.load(str(tmp_path))
    assert any("language model only" in r.getMessage() for r in caplog.records)
    assert (cfg.num_hidden_layers, cfg.n_routed_experts) == (2, 24)
    assert max_diff(our_logits(ours, tokens)[0], torch_logits(model, tokens)) <= TOL
    import json

    d = json.load(open(tmp_path / "config.json"))
    assert d["model_type"] == "mistral3" and d["text_config"]["model_type"] == "deepseek_v3"
    with pytest.raises(UserError, match="text_config.model_type"):
        parse_config(dict(d, text_config=dict(d["text_config"], model_type="mistral")))
    with pytest.raises(UserError, match="unknown field"):
        parse_config(dict(d, audio_config={}))
