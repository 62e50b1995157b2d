"""Model FLOPs: what a step of the model needs, counted from its parameters (the denominator of MFU).

The benchmarks (`benchmarks/train_throughput.py`) and the ahead-of-time reports (`dsv3_jax.aot`) use these, so a
measured or compiled figure is always set against the same formula. Everything works on an abstract model
(`model.abstract_model`), so the released 671B config costs nothing to count.
"""
from __future__ import annotations

import math

from flax import nnx

from dsv3_jax import param_kinds
from dsv3_jax.model import param_counts


def matmul_params_per_token(model) -> dict:
    """Parameters each token multiplies against in the forward pass, from `dsv3_jax.model.param_counts`.

    main: `params_active` of the main model (routed experts counted K/E, embedding and head included)
          less the embedding table (a gather, no FLOPs) and the RMSNorm gains (elementwise);
    mtp:  per MTP depth: that module's own parameters counted the same way (its block, eh_proj), plus
          the head it shares with the main model (applied once more per token: D x V).
    Works on an abstract model (`nnx.eval_shape`).
    """
    cfg = model.cfg
    K, E = cfg.num_experts_per_tok, max(cfg.n_routed_experts, 1)
    embed = norms = 0
    mtp = [0] * len(model.mtp)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = math.prod(int(d) for d in var.get_value().shape)
        kind = param_kinds.param_kind(path)
        if param_kinds.in_mtp(path):
            if kind == "norms":
                continue
            mtp[int(param_kinds.path_names(path)[1])] += n * K // E if kind == "routed_experts" else n
        elif kind == "embedding":
            embed += n
        elif kind == "norms":
            norms += n
    head = cfg.hidden_size * cfg.vocab_size
    return {"main": param_counts(model)["params_active"] - embed - norms, "mtp": [m + head for m in mtp]}


def train_flops_per_token(model, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward), as the benchmarks report it:

        6 * (N_main + sum_k N_mtp_k) + 6 * (L + D_mtp) * H * (dqk + dv) * T / 2
    """
    cfg = model.cfg
    p = matmul_params_per_token(model)
    layers = cfg.num_hidden_layers + len(p["mtp"])
    attn = 6 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    return 6 * (p["main"] + sum(p["mtp"])) + attn


def decode_flops_per_token(model, context: int) -> float:
    """Model FLOPs of one decoded token of the main model (forward only: 2 x the matmul parameters a token
    multiplies against) plus its attention over `context` cached positions, counted as the absorbed-MLA decode
    computes it: per layer and head, scores against the latent and rotary keys (kv_lora_rank + qk_rope_head_dim)
    and the weighted sum of latents (kv_lora_rank), 2 FLOPs per multiply-add. The MTP modules are not counted
    (speculation's drafts are extra work, not model FLOPs)."""
    cfg = model.cfg
    p = matmul_params_per_token(model)
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * context * (
        2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return 2 * p["main"] + attn


def attention_costs(cfg, context: int, itemsize: int = 2) -> dict:
    """Per token and layer at position `context` (decode), absorbed MLA dense against DeepSeek Sparse Attention
    (`cfg.index_topk`; V3.2): attention FLOPs (scores against R + dr and the weighted sum over R for every key
    read, per head; sparse adds the indexer's q . k per head and its head weights for every earlier key) and the
    cache bytes read (sparse: its top-k latents and every earlier indexer key), 2 FLOPs per multiply-add."""
    N, R, dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    H, Dh, k = cfg.index_n_heads, cfg.index_head_dim, min(cfg.index_topk, context)
    mla = lambda keys: 2 * N * keys * (R + dr + R)  # noqa: E731
    dense_flops, dense_bytes = mla(context), context * (R + dr) * itemsize
    sparse_flops = mla(k) + 2 * H * context * Dh + 2 * H * context
    sparse_bytes = k * (R + dr) * itemsize + context * Dh * itemsize
    return {"context": context, "dense_attn_flops": dense_flops, "sparse_attn_flops": sparse_flops,
            "flops_ratio": dense_flops / sparse_flops, "dense_cache_bytes_read": dense_bytes,
            "sparse_cache_bytes_read": sparse_bytes, "bytes_ratio": dense_bytes / sparse_bytes,
            "cache_bytes_per_token_dense": (R + dr) * itemsize,
            "cache_bytes_per_token_sparse": (R + dr + Dh) * itemsize}
