"""A DeepSeek-style model of a realistic size for one GPU (benchmarks/gpu_suite.sh): 2.6B parameters (0.7B
active per token, MTP 0.2B more) with every feature of V3 at a smaller width: MLA (d_model 2048, low-rank queries, a
512 + 64 latent), 32 routed experts of which 4 per token with group-limited routing, a shared expert, one
dense layer, MTP depth 1; 4096-token windows, bf16 compute on float32 master weights.

    python train.py --config configs/gpu_bench.py --dry_run      # parameter table and memory plan
    bash benchmarks/gpu_suite.sh                                  # the accelerator suite on this config

Sizes were picked so that the train step (parameters, gradients, AdamW moments: 16 bytes per parameter,
~40 GiB) and one 4-sequence batch of remat'd activations fit one 80 GiB H100."""
from dsv3_jax.config_base import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 32768
    m.hidden_size = 2048
    m.intermediate_size = 8192  # the dense layer
    m.moe_intermediate_size = 1024  # per routed expert; shared expert the same
    m.num_hidden_layers = 12  # 1 dense + 11 MoE
    m.num_attention_heads = 16
    m.q_lora_rank = 768
    m.kv_lora_rank = 512
    m.qk_nope_head_dim = 128
    m.qk_rope_head_dim = 64
    m.v_head_dim = 128
    m.n_routed_experts = 32
    m.n_shared_experts = 1
    m.num_experts_per_tok = 4
    m.n_group = 4
    m.topk_group = 2
    m.routed_scaling_factor = 2.5
    m.norm_topk_prob = True
    m.first_k_dense_replace = 1
    m.num_nextn_predict_layers = 1
    m.rms_norm_eps = 1e-6
    m.max_position_embeddings = 4096
    m.rope_theta = 10000.0
    m.initializer_range = 0.006
    m.dtype = "bfloat16"
    m.param_dtype = "float32"
    m.moe_impl = "auto"  # ragged_dot on an accelerator
    m.moe_block_size = 128
    m.fp8 = False  # the suite also runs the step with True
    m.expert_capacity_factor = 0.0
    m.expert_dispatch = "auto"
    m.attention = "auto"  # cuDNN flash attention on GPU

    c.train.batch_size = 4
    c.train.seq_len = 4096
    c.train.remat = True
    c.train.peak_lr = 4.2e-4
    c.train.warmup_steps = 10
    c.train.steps = 100
    c.moe.bias_update_rate = 0.001
    c.moe.seq_balance_alpha = 0.0001
    c.mtp.loss_weight = 0.3
    return c
