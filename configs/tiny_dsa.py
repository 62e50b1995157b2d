"""Tiny DeepSeek-V3.2: configs/tiny.py with DeepSeek Sparse Attention in every layer (the lightning indexer, 8 heads
of 32 dims, and MLA over each query's 32 keys scored highest of up to 128), for the two training stages on CPU:

    python train.py --config configs/tiny_dsa.py --workdir runs/warm --config.model.dsa.stage=dense_warmup \\
        --config.train.steps=100
    python train.py --config configs/tiny_dsa.py --workdir runs/sparse --config.init_from=runs/warm

The warm-up trains only the indexer, toward the dense attention's distribution (from the tiny model's weights:
start it with --config.init_from=<a tiny run>); the sparse stage trains everything, the indexer toward the sparse
attention's distribution. metrics.jsonl logs indexer_kl and index_recall."""
import ml_collections

from dsv3_jax.analysis import load_config


def get_config():
    c = load_config("tiny")  # (the sibling config, this one's base)
    m = c.model
    m.index_topk = 32  # keys each query attends to (V3.2: 2048 of up to 128K)
    m.index_n_heads = 8  # indexer heads (V3.2: 64)
    m.index_head_dim = 32  # indexer head dim (V3.2: 128), RoPE on its first qk_rope_head_dim channels
    m.dsa = ml_collections.ConfigDict({"stage": "sparse", "loss_weight": 1.0})  # dense_warmup | sparse
    return c
