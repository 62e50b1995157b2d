"""DeepSeek-V3.2 (V3.2-Exp / V3.2 as released): DeepSeek-V3's network (configs/deepseek_v3.py) with DeepSeek Sparse
Attention in every layer: the lightning indexer (64 heads of 128 dims) and MLA over each query's 2,048 keys scored
highest (dsv3_jax/dsa.py). Needs an accelerator mesh; `--dry_run` works anywhere."""
import ml_collections

from dsv3_jax.analysis import load_config


def get_config():
    c = load_config("deepseek_v3")  # (the sibling config, this one's base)
    m = c.model
    m.index_topk = 2048
    m.index_n_heads = 64
    m.index_head_dim = 128
    # training stage (V3.2 report): 'dense_warmup' (dense attention, only the indexer trains toward it; V3.2: 1,000
    # steps of 16 x 128K tokens at lr 1e-3) then 'sparse' (everything trains; V3.2: 15,000 steps at 7.3e-6)
    m.dsa = ml_collections.ConfigDict({"stage": "sparse", "loss_weight": 1.0})
    return c
