"""What a parameter is, from its path in the model tree: the one classifier of the package.

    param_kind(("moe_layers", "ffn", "w_gate"))          -> "routed_experts"
    param_kind(("dense_layers", "attn", "q_norm", "scale")) -> "norms"

Used by the parameter counts (`model.param_counts`, `train.plan.component_counts`, the benchmarks' FLOP
counts) and the optimizer's weight-decay mask (`train.optim.decay_mask`: no decay on norms and biases).
Paths may hold strings, integers (layer / MTP indices) or JAX key entries (`DictKey`, `GetAttrKey`, as
`jax.tree_util.tree_map_with_path` gives them); a trailing Variable value attribute is skipped.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("embedding", "lm_head", "norms", "bias", "attention", "routed_experts", "router", "shared_experts",
         "mtp_projection", "dense_ffn")
ROUTED = ("w_gate", "w_up", "w_down")
_VALUE_ATTRS = ("value", "raw_value", "_value")


def path_names(path: Sequence) -> list[str]:
    """The path as names: str/int keys as they are (ints as strings), JAX key entries unwrapped."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            k = k.key
        elif isinstance(k, jax.tree_util.GetAttrKey):
            k = k.name
        elif isinstance(k, jax.tree_util.SequenceKey):
            k = k.idx
        names.append(str(k))
    if names and names[-1] in _VALUE_ATTRS:
        names.pop()
    return names


def param_kind(path: Sequence) -> str:
    """One of KINDS for the parameter at `path` (the MTP modules' parameters get their own block's kinds)."""
    names = path_names(path)
    if not names:
        return "dense_ffn"
    last = next((n for n in reversed(names) if not n.isdigit()), "")  # a list index is not a name
    if names[0] == "embed":
        return "embedding"
    if names[0] == "lm_head":
        return "lm_head"
    if last == "scale" or (last == "bias" and any(n.endswith("norm") for n in names)):  # (LayerNorm's bias:
        return "norms"  # the V3.2 indexer's key norm)
    if last.endswith("bias"):
        return "bias"
    if "attn" in names:
        return "attention"
    if last in ROUTED:
        return "routed_experts"
    if last == "router":
        return "router"
    if "shared" in names:
        return "shared_experts"
    if "eh_proj" in names:
        return "mtp_projection"
    return "dense_ffn"


# Kinds whose every use in the model is `astype(compute dtype)` (the projections, experts, embedding and head);
# norms, biases and the router compute in float32.
CAST_AT_USE = ("embedding", "lm_head", "attention", "routed_experts", "shared_experts", "mtp_projection", "dense_ffn")


def cast_for_compute(params, dtype):
    """The parameters of CAST_AT_USE kinds cast to the compute `dtype` once, before the model runs: the same numbers
    the model computes with (it casts them at use), but on a mesh XLA's FSDP all-gathers, and the gathered copies it
    keeps for the backward, move compute-dtype weights instead of float32 masters (V3 on v5p: 120 -> 91 GB per
    device, README). Gradients reach the float32 masters through the cast, as they did through the cast at use."""
    def leaf(path, x):
        if param_kind(path) not in CAST_AT_USE or not jnp.issubdtype(x.dtype, jnp.floating) or _fp8_resident(path, x):
            return x  # (FP8-resident blocks and their scales are used as they are)
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(leaf, params)


def _fp8_resident(path, x) -> bool:
    names = path_names(path)
    return x.dtype == jnp.float8_e4m3fn or bool(names and names[-1].endswith("_scale"))


def in_mtp(path: Sequence) -> bool:
    """True for the parameters of the MTP modules (their own; embedding and head are shared)."""
    names = path_names(path)
    return bool(names) and names[0] == "mtp"


def decays(path: Sequence) -> bool:
    """AdamW weight decay applies (everything but RMSNorm gains and biases)."""
    return param_kind(path) not in ("norms", "bias")


def trainable_counts(params, trainable=None) -> dict:
    """{'trainable_params', 'total_params'} of a parameter tree (arrays or ShapeDtypeStructs; any layout):
    `trainable(path) -> bool` as the optimizer's (None: every parameter trains)."""
    counts = {"trainable_params": 0, "total_params": 0}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        n = int(np.prod(x.shape))
        counts["total_params"] += n
        counts["trainable_params"] += n if trainable is None or trainable(path) else 0
    return counts


def freeze_fp8(params):
    """`params` with the gradient stopped at every FP8-resident leaf (float8 blocks and their `*_scale`s): a frozen
    FP8 base (LoRA) is not differentiated, so its GEMMs only pass the activations' gradients (`fp8/resident.py`)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: jax.lax.stop_gradient(x) if _fp8_resident(p, x) else x,
                                            params)


def in_indexer(path: Sequence) -> bool:
    """True for the parameters of a sparse-attention indexer (`dsa.Indexer`): what DSA's dense warm-up trains."""
    return "indexer" in path_names(path)
