"""Tiny DeepSeek-V3 (~7M parameters) that trains on 2 CPU cores in minutes yet uses every feature:
low-rank queries, group-limited routing, a shared expert, dense + MoE layers, YaRN and MTP."""
from dsv3_jax.config_base import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size = 4096  # BPE vocabulary trained on the corpus (tokenizer ids must fit)
    m.hidden_size = 256  # D
    m.intermediate_size = 512  # dense SwiGLU width
    m.moe_intermediate_size = 128  # each routed expert's width (shared expert: this * n_shared_experts)
    m.num_hidden_layers = 4  # 1 dense + 3 MoE
    m.num_attention_heads = 4  # N
    m.q_lora_rank = 96  # query latent rank (None: direct q projection)
    m.kv_lora_rank = 64  # R: the cached latent
    m.qk_nope_head_dim = 32  # dn
    m.qk_rope_head_dim = 16  # dr
    m.v_head_dim = 32  # dv
    m.n_routed_experts = 16  # E
    m.n_shared_experts = 1  # always-on experts
    m.num_experts_per_tok = 4  # K
    m.n_group = 4  # expert groups for group-limited routing
    m.topk_group = 2  # groups each token may use
    m.routed_scaling_factor = 2.5  # multiplies the normalised routed weights
    m.norm_topk_prob = True  # normalise the top-K sigmoid scores to sum to 1
    m.first_k_dense_replace = 1  # leading dense layers
    m.num_nextn_predict_layers = 1  # MTP depth D
    m.rms_norm_eps = 1e-6
    m.max_position_embeddings = 1024  # context limit
    m.rope_theta = 10000.0
    m.rope_scaling = dict(  # YaRN: extend a 256-token rope to 1024
        type="yarn", factor=4.0, original_max_position_embeddings=256, beta_fast=32.0, beta_slow=1.0,
        mscale=1.0, mscale_all_dim=1.0)
    m.initializer_range = 0.02  # init std (DeepSeek-V3: 0.006 at 7168 wide)
    m.dtype = "float32"  # compute dtype: float32 on CPU (XLA:CPU bf16 matmuls are slower)
    m.param_dtype = "float32"  # master weights
    m.moe_impl = "auto"  # blocks on CPU, ragged_dot elsewhere
    m.moe_block_size = 128  # rows per expert block in the CPU layout
    m.fp8 = False  # FP8 block-scaled GEMMs (True: DeepSeek-V3 recipe; on CPU the jnp formulation)
    m.expert_capacity_factor = 0.0  # expert parallelism: 0 = dropless
    m.expert_dispatch = "auto"  # expert parallelism: ragged_all_to_all on GPU/TPU, all_to_all on CPU
    m.attention = "auto"  # training attention core: einsum on CPU, cuDNN flash attention on GPU, blockwise on TPU

    c.train.steps = 300
    c.train.batch_size = 16
    c.train.seq_len = 128
    c.train.peak_lr = 3e-3
    c.train.warmup_steps = 30
    c.train.log_every = 10
    c.train.eval_every = 100
    c.moe.bias_update_rate = 0.01  # gamma: 10x DeepSeek's 0.001, so a 300-step run visibly balances the experts
    c.checkpoint.every_steps = 100
    return c
