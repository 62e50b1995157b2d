"""Which Hugging Face tensor fills which slice of which dsv3_jax parameter, and how it is reshaped.

Our parameters (a pure dict from `nnx.state`) differ from the released checkpoint in three ways:
  * Stacking: dense layers 0..k-1 form one stack `dense_layers/...` [L_dense, ...] and MoE layers
    k..L-1 another, `moe_layers/...` [L_moe, ...]; routed experts add an axis: `w_gate` [L_moe, E, D, F].
    One HF tensor fills one slice `leaf[index]` (index = (layer,) or (layer, expert)).
  * Orientation: weights are stored "in -> out" for einsums; HF linear weights are [out, in].
  * Heads are explicit axes: `wq_b` [Q, N, dn+dr], `wkv_b` [R, N, dn+dv], `wo` [N, dv, D], where HF
    flattens heads into rows (q_b_proj [N*(dn+dr), Q], row n*(dn+dr)+h) or columns (o_proj [D, N*dv]).

A `Piece` names one such copy: HF key (optionally a leading index and row range of it, for the fused
expert tensors), destination leaf and index, and a transform `kind`:
    copy   identity (norm scales, embedding, router bias)
    t      transpose [out, in] -> [in, out]
    q      [N*H, In] -> [In, N, H]   (q_b_proj / q_proj; rope rows of each head may be permuted)
    kv_b   [N*H, R] -> [R, N, H]
    kv_a   transpose, rope rows [R : R+dr] may be permuted
    o      [D, N*dv] -> [N, dv, D]

FP8-resident leaves (a model built with `Runtime.fp8_weights`, see dsv3_jax/fp8/resident.py) hold the
checkpoint's own [out, in] orientation with the head axes split out, so a piece of such a leaf is only a
reshape of the HF tensor (`to_ours_fp8`): q_b_proj [N*H, Q] -> [N, H, Q], o_proj [D, N*dv] -> [D, N, dv],
the rest as stored. The leaf's block scales (`<leaf>_scale`, [Nb, Kb] after the stacked axes) are filled
from the same HF tensor's `weight_scale_inv` by the loader; they have no piece of their own.

RoPE layout: we rotate interleaved pairs (2i, 2i+1) like DeepSeek's code. HF with
`rope_interleave=True` (its default, and what the released weights assume) rotates the same pairs and
only reorders its outputs, identically for q and k, so scores and logits are unchanged: no permutation.
A checkpoint written for `rope_interleave=False` (rotate-half pairs (i, i + dr/2)) is loaded by
permuting the dr rope rows of each query head and of k_pe: ours[2i] = hf[i], ours[2i+1] = hf[i + dr/2].
We always save the interleaved form.

Routed experts come per expert (`mlp.experts.{e}.gate_proj.weight` [F, D], what `save_pretrained`
and the release write) or fused (`mlp.experts.gate_up_proj` [E, 2F, D] with gate rows first,
`mlp.experts.down_proj` [E, D, F], the in-memory layout of transformers >= 5). MTP depth k lives at HF
layer index num_hidden_layers + k - 1 with `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and a full
block; its `embed_tokens` and `shared_head.head` are copies of the main ones (`Alias`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.model import abstract_model
from dsv3_jax.moe import RouterBias
from dsv3_jax.runtime import Runtime

Path = tuple  # ("params" | "biases", key, ...): a leaf of the pure-dict state


@dataclasses.dataclass(frozen=True)
class Format:
    """How one HF checkpoint lays out its tensors (detected on load, fixed on save)."""

    fused_experts: bool = False
    rope_interleave: bool = True
    mtp_layers: int = 0


class Piece(NamedTuple):
    leaf: Path
    index: tuple  # leading (stacked) indices of `leaf` that this tensor fills
    key: str  # HF tensor name
    kind: str  # copy | t | q | kv_b | kv_a | o
    select: tuple = ()  # leading index into the HF tensor (fused experts: (e,))
    rows: tuple | None = None  # row range of HF tensor[select] (fused gate / up halves)


class Alias(NamedTuple):
    key: str  # e.g. model.layers.61.embed_tokens.weight
    source: str  # the tensor it must equal, e.g. model.embed_tokens.weight


@dataclasses.dataclass
class Plan:
    pieces: list[Piece]
    aliases: list[Alias]
    expected: dict[str, tuple]  # HF key -> full tensor shape
    leaves: dict[Path, jax.ShapeDtypeStruct]  # our leaves (params and biases)
    quantizable: set[str]  # projection weights that the release stores in FP8


# ---------------------------------------------------------------------- our side of the mapping

def abstract_states(cfg: ModelConfig, runtime: Runtime | None = None):
    """(graphdef, abstract params state, abstract biases state) without allocating any weight."""
    return nnx.split(abstract_model(cfg, runtime), nnx.Param, RouterBias)


def flatten(tree, prefix: Path = ()) -> dict[Path, object]:
    """Nested dicts -> {path tuple: leaf}."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, prefix + (k,)))
        return out
    return {prefix: tree}


def unflatten_into(skeleton, flat: dict[Path, object], prefix: Path = ()):
    """A copy of the nested dict `skeleton` whose leaves are replaced by flat[path]."""
    if isinstance(skeleton, dict):
        return {k: unflatten_into(v, flat, prefix + (k,)) for k, v in skeleton.items()}
    return flat[prefix]


def leaf_specs(params_state, biases_state) -> dict:
    """PartitionSpec of every leaf, from its logical axis names and dsv3_jax.sharding's rules table."""
    from jax.sharding import PartitionSpec

    from dsv3_jax.sharding import logical_to_spec

    out = {}
    for root, state in (("params", params_state), ("biases", biases_state)):
        for path, var in nnx.to_flat_state(state):
            names = var.get_metadata().get("out_sharding")
            out[(root,) + tuple(path)] = PartitionSpec() if names is None else logical_to_spec(names)
    return out


def model_leaves(params_state, biases_state) -> dict[Path, jax.ShapeDtypeStruct]:
    flat = flatten({"params": nnx.to_pure_dict(params_state), "biases": nnx.to_pure_dict(biases_state)})
    return {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in flat.items()}


# ---------------------------------------------------------------------- transforms

def rope_order(dr: int) -> np.ndarray:
    """Rows of a rotate-half rope block in interleaved order: [0, dr/2, 1, dr/2 + 1, ...]."""
    return np.stack([np.arange(dr // 2), np.arange(dr // 2) + dr // 2], axis=1).reshape(-1)


# Number of trailing (input, K) axes of an FP8-resident leaf slice, per transform: [N..., K...] -> [N, K].
_FP8_K_AXES = {"t": 1, "kv_a": 1, "q": 1, "kv_b": 1, "o": 2}


def is_fp8_leaf(sds) -> bool:
    return np.dtype(sds.dtype) == np.dtype(jnp.float8_e4m3fn)


def scale_leaf(path: Path) -> Path:
    """The block-scale leaf of an FP8-resident leaf: .../kernel -> .../kernel_scale, w_gate -> w_gate_scale."""
    return path[:-1] + (str(path[-1]) + "_scale",)


def hf_shape(kind: str, block: tuple, fp8: bool = False) -> tuple:
    """Shape of the HF tensor (part) that fills a leaf slice of shape `block` (an FP8-resident leaf's
    slice is [N..., K...], the HF tensor [N, K])."""
    if fp8:
        nk = _FP8_K_AXES[kind]
        return (math.prod(block[: len(block) - nk]), math.prod(block[len(block) - nk:]))
    if kind == "copy":
        return tuple(block)
    if kind in ("t", "kv_a"):
        return (block[1], block[0])
    if kind in ("q", "kv_b"):
        return (block[1] * block[2], block[0])
    if kind == "o":
        return (block[2], block[0] * block[1])
    raise UserError(f"unknown transform {kind!r}")


def to_ours(x: np.ndarray, kind: str, block: tuple, cfg: ModelConfig, fmt: Format) -> np.ndarray:
    """HF tensor (part) -> our leaf slice of shape `block`."""
    dn, dr, R = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    if kind == "copy":
        return x
    if kind == "t":
        return x.T
    if kind == "kv_a":
        if not fmt.rope_interleave:
            x = np.concatenate([x[:R], x[R:][rope_order(dr)]], axis=0)
        return x.T
    if kind in ("q", "kv_b"):
        In, N, H = block
        x = x.reshape(N, H, In)
        if kind == "q" and not fmt.rope_interleave:
            x = np.concatenate([x[:, :dn], x[:, dn:][:, rope_order(dr)]], axis=1)
        return x.transpose(2, 0, 1)
    if kind == "o":
        N, dv, D = block
        return x.reshape(D, N, dv).transpose(1, 2, 0)
    raise UserError(f"unknown transform {kind!r}")


def _fp8_rope_rows(kind: str, rows: int, cfg: ModelConfig) -> np.ndarray | None:
    """Source row of each destination row when a rotate-half checkpoint's rope rows are reordered, else None."""
    dn, dr, R = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    if kind == "kv_a":
        return np.concatenate([np.arange(R), R + rope_order(dr)])
    if kind == "q":
        H = dn + dr
        head = np.concatenate([np.arange(dn), dn + rope_order(dr)])
        return (np.arange(rows // H)[:, None] * H + head[None]).reshape(-1)
    return None


def to_ours_fp8(q: np.ndarray, kind: str, block: tuple, cfg: ModelConfig, fmt: Format, block_rows: int = 128):
    """An HF FP8 tensor (part) [N, K] -> the FP8-resident leaf slice [N..., K...] (a reshape; a rotate-half
    checkpoint's rope rows are reordered, which keeps every row inside its 128-row scale block or fails)."""
    if not fmt.rope_interleave and kind in ("q", "kv_a"):
        src = _fp8_rope_rows(kind, q.shape[0], cfg)
        if np.any(src // block_rows != np.arange(len(src)) // block_rows):
            raise UserError("this checkpoint stores rope rows in rotate-half order (rope_interleave=false) across "
                            "128-row FP8 scale blocks: reordering them cannot keep the blocks exact. Load it without "
                            "keep_fp8 (dequantised), or save it interleaved first")
        q = q[src]
    return q.reshape(block)


def to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    """Our leaf slice -> HF tensor (always the interleaved rope layout)."""
    if kind == "copy":
        return x
    if kind in ("t", "kv_a"):
        return x.T
    if kind in ("q", "kv_b"):
        In, N, H = x.shape
        return x.transpose(1, 2, 0).reshape(N * H, In)
    if kind == "o":
        N, dv, D = x.shape
        return x.transpose(2, 0, 1).reshape(D, N * dv)
    raise UserError(f"unknown transform {kind!r}")


# ---------------------------------------------------------------------- the plan

def _block(cfg: ModelConfig, prefix: str, leaf: Path, index: tuple, moe: bool, fmt: Format, add):
    """Pieces of one transformer block: HF `prefix` (model.layers.{i}.) -> our `leaf` subtree at `index`."""
    a = prefix + "self_attn."
    add(leaf + ("attn_norm", "scale"), index, prefix + "input_layernorm.weight", "copy")
    add(leaf + ("ffn_norm", "scale"), index, prefix + "post_attention_layernorm.weight", "copy")
    att = leaf + ("attn",)
    if cfg.q_lora_rank is None:
        add(att + ("wq", "kernel"), index, a + "q_proj.weight", "q", q=True)
    else:
        add(att + ("wq_a", "kernel"), index, a + "q_a_proj.weight", "t", q=True)
        add(att + ("q_norm", "scale"), index, a + "q_a_layernorm.weight", "copy")
        add(att + ("wq_b", "kernel"), index, a + "q_b_proj.weight", "q", q=True)
    add(att + ("wkv_a", "kernel"), index, a + "kv_a_proj_with_mqa.weight", "kv_a", q=True)
    add(att + ("kv_norm", "scale"), index, a + "kv_a_layernorm.weight", "copy")
    add(att + ("wkv_b", "kernel"), index, a + "kv_b_proj.weight", "kv_b", q=True)
    add(att + ("wo", "kernel"), index, a + "o_proj.weight", "o", q=True)
    if cfg.dsa:  # V3.2's lightning indexer (dsa.py); its RoPE channels are rotate-half in every checkpoint
        ix, ia = att + ("indexer",), a + "indexer."
        add(ix + ("wq_b", "kernel"), index, ia + "wq_b.weight", "kv_b", q=True)  # [H*Dh, Q] -> [Q, H, Dh]
        add(ix + ("wk", "kernel"), index, ia + "wk.weight", "t", q=True)
        add(ix + ("k_norm", "scale"), index, ia + "k_norm.weight", "copy")
        add(ix + ("k_norm", "bias"), index, ia + "k_norm.bias", "copy")
        add(ix + ("weights_proj", "kernel"), index, ia + "weights_proj.weight", "t")
    m, ffn = prefix + "mlp.", leaf + ("ffn",)
    if not moe:
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            add(ffn + (ours, "kernel"), index, f"{m}{theirs}.weight", "t", q=True)
        return
    add(ffn + ("router",), index, m + "gate.weight", "t")
    bias_leaf = ("biases",) + ffn[1:] + ("bias",)
    add(bias_leaf, index, m + "gate.e_score_correction_bias", "copy")
    E, F = cfg.n_routed_experts, cfg.moe_intermediate_size
    for e in range(E):
        if fmt.fused_experts:
            add(ffn + ("w_gate",), index + (e,), m + "experts.gate_up_proj", "t", select=(e,), rows=(0, F))
            add(ffn + ("w_up",), index + (e,), m + "experts.gate_up_proj", "t", select=(e,), rows=(F, 2 * F))
            add(ffn + ("w_down",), index + (e,), m + "experts.down_proj", "t", select=(e,))
        else:
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                add(ffn + (ours,), index + (e,), f"{m}experts.{e}.{theirs}.weight", "t", q=True)
    if fmt.fused_experts:
        D = cfg.hidden_size
        add.expect(m + "experts.gate_up_proj", (E, 2 * F, D))
        add.expect(m + "experts.down_proj", (E, D, F))
    if cfg.n_shared_experts > 0:
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            add(ffn + ("shared", ours, "kernel"), index, f"{m}shared_experts.{theirs}.weight", "t", q=True)


class _Collector:
    def __init__(self, leaves):
        self.leaves, self.pieces, self.expected, self.quantizable = leaves, [], {}, set()

    def __call__(self, leaf, index, key, kind, select=(), rows=None, q=False):
        if leaf not in self.leaves:
            raise KeyError(f"dsv3_jax.interop.layout maps {key} to {'/'.join(map(str, leaf))}, which the model "
                           f"does not have: the parameter tree changed, update layout.py")
        self.pieces.append(Piece(leaf, index, key, kind, select, rows))
        if not select and rows is None:
            sds = self.leaves[leaf]
            self.expected[key] = hf_shape(kind, sds.shape[len(index):], is_fp8_leaf(sds))
        if q:
            self.quantizable.add(key)

    def expect(self, key, shape):
        self.expected[key] = tuple(shape)


def plan(cfg: ModelConfig, fmt: Format, leaves: dict[Path, jax.ShapeDtypeStruct]) -> Plan:
    """Every piece, alias and expected HF tensor shape for a model `cfg` stored in format `fmt`."""
    add = _Collector(leaves)
    add(("params", "embed", "embedding"), (), "model.embed_tokens.weight", "copy")
    add(("params", "norm", "scale"), (), "model.norm.weight", "copy")
    add(("params", "lm_head"), (), "lm_head.weight", "t")
    k = cfg.first_k_dense_replace
    for i in range(cfg.num_hidden_layers):
        stack, j = ("dense_layers", i) if i < k else ("moe_layers", i - k)
        _block(cfg, f"model.layers.{i}.", ("params", stack), (j,), i >= k, fmt, add)
    aliases = []
    for d in range(fmt.mtp_layers):
        p, leaf = f"model.layers.{cfg.num_hidden_layers + d}.", ("params", "mtp", d)
        add(leaf + ("enorm", "scale"), (), p + "enorm.weight", "copy")
        add(leaf + ("hnorm", "scale"), (), p + "hnorm.weight", "copy")
        add(leaf + ("eh_proj", "kernel"), (), p + "eh_proj.weight", "t")
        add(leaf + ("norm", "scale"), (), p + "shared_head.norm.weight", "copy")
        _block(cfg, p, leaf + ("block",), (), cfg.has_moe, fmt, add)
        aliases += [Alias(p + "embed_tokens.weight", "model.embed_tokens.weight"),
                    Alias(p + "shared_head.head.weight", "lm_head.weight")]
        add.expect(p + "embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        add.expect(p + "shared_head.head.weight", (cfg.vocab_size, cfg.hidden_size))
    _check_coverage(add.pieces, leaves)
    return Plan(add.pieces, aliases, add.expected, leaves, add.quantizable)


def _check_coverage(pieces: list[Piece], leaves: dict[Path, jax.ShapeDtypeStruct]):
    """Every element of every leaf is written exactly once (guards layout.py against model changes)."""
    seen: dict[Path, set] = {}
    for p in pieces:
        s = seen.setdefault(p.leaf, set())
        if p.index in s:
            raise AssertionError(f"layout.py writes {'/'.join(map(str, p.leaf))}{list(p.index)} twice")
        s.add(p.index)
    fp8_scales = {scale_leaf(p) for p, leaf in leaves.items() if is_fp8_leaf(leaf)}
    for path, leaf in leaves.items():
        if path in fp8_scales:  # filled with its weight (the HF tensor's weight_scale_inv)
            continue
        count = len(seen.get(path, ()))
        stacked = {len(i) for i in seen.get(path, ())}
        need = math.prod(leaf.shape[:next(iter(stacked))]) if stacked else 1
        if count != need:
            raise KeyError(f"dsv3_jax.interop.layout has no HF source for {'/'.join(map(str, path))} "
                           f"{tuple(leaf.shape)} ({count} of {need} slices mapped): the parameter tree changed, "
                           f"update layout.py")
