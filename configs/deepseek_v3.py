"""DeepSeek-V3 (671B main model + 11.6B MTP) exactly as released (REFERENCE.md section 1), with the
training recipe of the technical report (section 4.2). Needs an accelerator mesh; `--dry_run` works anywhere."""
from dsv3_jax.config_base import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 129280
    m.hidden_size = 7168
    m.intermediate_size = 18432  # dense layers 0-2
    m.moe_intermediate_size = 2048  # per routed expert; shared expert 2048
    m.num_hidden_layers = 61
    m.num_attention_heads = 128
    m.q_lora_rank = 1536
    m.kv_lora_rank = 512  # 512 + 64 = 576 cached values per token per layer
    m.qk_nope_head_dim = 128
    m.qk_rope_head_dim = 64
    m.v_head_dim = 128
    m.n_routed_experts = 256
    m.n_shared_experts = 1
    m.num_experts_per_tok = 8
    m.n_group = 8
    m.topk_group = 4
    m.routed_scaling_factor = 2.5
    m.norm_topk_prob = True
    m.first_k_dense_replace = 3
    m.num_nextn_predict_layers = 1
    m.rms_norm_eps = 1e-6
    m.max_position_embeddings = 163840
    m.rope_theta = 10000.0
    m.rope_scaling = dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                          beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    m.initializer_range = 0.006
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.moe_impl = "auto"
    m.moe_block_size = 64
    m.fp8 = False  # set True for the FP8 training recipe
    m.expert_capacity_factor = 0.0  # dropless expert parallelism
    m.expert_dispatch = "auto"  # ragged_all_to_all on GPU/TPU; padded all_to_all on CPU
    m.attention = "auto"  # cuDNN flash attention on GPU (MLA head dims need Hopper, cuDNN 9.10), blockwise on TPU

    c.train.steps = 450_000  # recalled order of magnitude: 14.8T tokens / (15360 x 4096)
    c.train.batch_size = 15360
    c.train.batch_size_start = 3072  # batch ramp over the first 469B tokens
    c.train.batch_ramp_steps = 20_000
    c.train.seq_len = 4096
    c.train.peak_lr = 2.2e-4
    c.train.warmup_steps = 2000
    c.train.remat = True
    c.moe.bias_update_rate = 0.001
    c.moe.seq_balance_alpha = 0.0001
    c.mtp.loss_weight = 0.3
    c.mtp.loss_weight_after = 0.1
    return c
