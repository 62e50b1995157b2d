"""DeepSeek-V3.2 (V3.2-Exp / V3.2 as released): DeepSeek-V3's network (configs/deepseek_v3.py) with DeepSeek Sparse
Attention in every layer: the lightning indexer (64 heads of 128 dims) and MLA over each query's 2,048 keys scored
highest (dsv3_jax/dsa.py). Needs an accelerator mesh; `--dry_run` works anywhere."""
import importlib.util
import os

import ml_collections


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepseek_v3.py")
    spec = importlib.util.spec_from_file_location("deepseek_v3_config", path)
    v3 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(v3)
    c = v3.get_config()
    m = c.model
    m.index_topk = 2048
    m.index_n_heads = 64
    m.index_head_dim = 128
    # training stage (V3.2 report): 'dense_warmup' (dense attention, only the indexer trains toward it; V3.2: 1,000
    # steps of 16 x 128K tokens at lr 1e-3) then 'sparse' (everything trains; V3.2: 15,000 steps at 7.3e-6)
    m.dsa = ml_collections.ConfigDict({"stage": "sparse", "loss_weight": 1.0})
    return c
