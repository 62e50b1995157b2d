"""Dry run: build the model abstractly (`nnx.eval_shape`, nothing allocated) and report its size.

Counts come from the real module tree (`dsv3_jax.model.param_counts`), not from a formula, so they
check the code as well as the config. For the released DeepSeek-V3 config this prints 671.0B main
parameters, 11.6B MTP parameters of its own (embedding and head are shared with the main model) and
~37.6B activated per token (routed experts counted K/E, embedding and head included).
"""
from __future__ import annotations

import json

from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3, param_counts


def abstract_model(cfg: ModelConfig) -> DeepSeekV3:
    return nnx.eval_shape(lambda: DeepSeekV3(cfg, rngs=nnx.Rngs(0)))


def component_counts(model: DeepSeekV3) -> dict[str, int]:
    """Main-model parameters per component: embedding, head, attention, dense FFN, routed, shared, router, norms."""
    out = dict.fromkeys(["embedding", "lm_head", "attention", "dense_ffn", "routed_experts", "shared_experts",
                         "router", "norms"], 0)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        if names[0] == "mtp":
            continue
        n = 1
        for s in var.get_value().shape:
            n *= int(s)
        last = names[-1]
        if names[0] == "embed":
            key = "embedding"
        elif names[0] == "lm_head":
            key = "lm_head"
        elif last == "scale":
            key = "norms"
        elif "attn" in names:
            key = "attention"
        elif last in ("w_gate", "w_up", "w_down"):
            key = "routed_experts"
        elif last == "router":
            key = "router"
        elif "shared" in names:
            key = "shared_experts"
        else:
            key = "dense_ffn"
        out[key] += n
    return out


def dry_run(cfg: ModelConfig) -> dict:
    model = abstract_model(cfg)
    counts = param_counts(model)
    parts = component_counts(model)
    print(f"{'component':<28}{'parameters':>20}")
    for k, v in parts.items():
        print(f"{k:<28}{v:>20,}")
    print("-" * 48)
    rows = [("main model (total)", counts["params_total"]), ("MTP modules (own)", counts["params_mtp"]),
            ("activated per token", counts["params_active"])]
    for k, v in rows:
        print(f"{k:<28}{v:>20,}  ({v / 1e9:.1f}B)")
    print(json.dumps(counts))
    return counts
