"""The train state of a scheduled pipeline in the slot layout, and its checkpoints.

Under a scheduled pipeline (`pipeline_exec.py`) train.py keeps the layer stacks of the parameters and of the
optimizer state in the program's slot layout: each stack leaf [L, ...] is held as [S, v, k, ...] with dim 0 on
'stage', so a device stores only its own stage's layers (plus its ghost slots) and the step hands them to the
program as they are: no layer crosses a stage, in the step or in the optimizer update. The parts outside the
stacks (embedding, final norm, head, MTP modules) keep their shape and are stored split over 'stage' as well
(`end_spec`: 1/S per device, with their AdamW moments; the program gathers them at the start of the step).
The router biases ([L, E]) stay replicated.

    layer layout   params["moe_layers"]...w  [L, ...]            (the model's, and every reader's)
    slot layout    params["moe_layers"]...w  [S, v, k, ...]      slot (s, c, j) holds layer index[s, c, j]

A ghost slot (index -1) holds a copy of layer 0 (finite values, so the masked ghost's backward stays finite);
it receives zero gradients and is never read back into a layer.

Checkpoints are written as the state is, with the layout in the step's JSON meta (`META_KEY`: {kind: index}),
and every restore converts when the reader's layout differs (`restore_target`): train.py resuming with another
stage count or without a pipeline, and infer.py / `load_trained`, which read the layer layout. A checkpoint
without the key holds the layer layout.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.io.checkpoint import Reshaped, abstract_leaf

META_KEY = "pipeline_slots"
STACKS = {"dense_layers": "dense", "moe_layers": "moe"}  # state key of a stack -> its kind
SLOTTED = ("params", "opt_state")  # the entries of the train state held in the slot layout


def _kind(path) -> str | None:
    for k in path:
        name = getattr(k, "key", None)
        if name in STACKS:
            return STACKS[name]
    return None


def _map_stacks(tree, fn):
    """fn(kind, leaf) on every leaf inside a layer stack, the others as they are."""
    def one(path, a):
        kind = _kind(path)
        return a if kind is None else fn(kind, a)

    return jax.tree_util.tree_map_with_path(one, tree)


def _slotted_entries(state: dict, fn) -> dict:
    """fn applied to the entries of a train state (or a params/biases subset) held in the slot layout."""
    return {k: (_map_stacks(v, fn) if k in SLOTTED else v) for k, v in state.items()}


def stack_to_slots(tree, index: np.ndarray):
    """One stack's [L, ...] leaves -> [S, v, k, ...] (ghost slots hold a copy of layer 0; they are never run)."""
    idx = np.maximum(index, 0)
    return jax.tree.map(lambda a: a[idx], tree)


def stack_from_slots(tree, index: np.ndarray, layers: int | None = None):
    """One stack's [S, v, k, ...] leaves (parameters, gradients, stats) -> [L, ...], each layer from its one real
    slot."""
    flat = index.reshape(-1)
    real = np.nonzero(flat >= 0)[0]
    order = real[np.argsort(flat[real])]
    assert (flat[order] == np.arange(len(order))).all() and layers in (None, len(order)), \
        "a layer is held by no slot or by two"
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[3:])[order], tree)


def to_slots(state: dict, index: dict) -> dict:
    """Layer layout -> slot layout (`index`: {kind: [S, v, k] layer ids, -1 ghost})."""
    return _slotted_entries(state, lambda kind, a: stack_to_slots(a, index[kind]))


def to_layers(state: dict, index: dict) -> dict:
    """Slot layout -> layer layout."""
    return _slotted_entries(state, lambda kind, a: stack_from_slots(a, index[kind]))


def relayout(state: dict, src: dict | None, dst: dict | None) -> dict:
    """From layout `src` to layout `dst` (None: the layer layout)."""
    if src is not None:
        state = to_layers(state, src)
    return state if dst is None else to_slots(state, dst)


def slot_spec(spec: P) -> P:
    """A stack leaf's layer-layout spec ('layers' axis first) -> its slot-layout spec: [S, v, k] with S on
    'stage', the rest as before (never on 'stage' again)."""
    inner = tuple(None if a == "stage" else a for a in tuple(spec)[1:])
    return P("stage", None, None, *inner)


def end_spec(shape, spec, sizes: dict) -> P:
    """A parameter outside the stacks (embedding, final norm, head, MTP modules): stored split over 'stage' too,
    on its largest dim that divides by the stages times the axes already there (each device keeps 1/S of it;
    the program gathers it whole at the start of the step, see `pipeline_exec.value_and_grad`), else as the
    rules table says. Without this every stage group would store, and update, a whole copy."""
    spec = [None if a == "stage" else a for a in tuple(spec)] + [None] * (len(shape) - len(tuple(spec)))
    S = sizes.get("stage", 1)

    def axes(d):
        a = spec[d]
        return () if a is None else (a if isinstance(a, tuple) else (a,))

    fits = [d for d, n in enumerate(shape) if n % (S * math.prod(sizes[a] for a in axes(d))) == 0]
    if S > 1 and fits:
        d = max(fits, key=lambda i: shape[i])
        spec[d] = axes(d) + ("stage",) if axes(d) else "stage"
    return P(*spec)


def slot_specs(state_specs: dict, shapes: dict, sizes: dict) -> dict:
    """PartitionSpecs of a train state's params and biases under a scheduled pipeline, from the rules table's
    (`shapes`: the same trees of ShapeDtypeStructs, `sizes`: the mesh): the stacks in the slot layout, the
    other parameters split over 'stage' as well (`end_spec`), the router biases ([L, E]) replicated over it."""
    is_spec = lambda x: isinstance(x, P)  # noqa: E731

    def param(path, sp, shape):
        return end_spec(shape.shape, sp, sizes) if _kind(path) is None else slot_spec(sp)

    out = {"params": jax.tree_util.tree_map_with_path(param, state_specs["params"], shapes["params"],
                                                       is_leaf=is_spec)}
    out["biases"] = jax.tree.map(lambda sp: P(*(None if a == "stage" else a for a in tuple(sp))),
                                 state_specs["biases"], is_leaf=is_spec)
    return out


def save_meta(index: dict | None) -> dict:
    """The checkpoint meta entry for a state in `index`'s slot layout ({} for the layer layout)."""
    return {} if index is None else {META_KEY: {k: np.asarray(v).tolist() for k, v in index.items()}}


def saved_index(meta: dict) -> dict | None:
    """The slot layout a checkpoint was written in (None: the layer layout)."""
    got = meta.get(META_KEY)
    return None if not got else {k: np.asarray(v, np.int64) for k, v in got.items()}


def same(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _abstract_in(abstract: dict, src: dict | None, dst: dict | None) -> dict:
    """The ShapeDtypeStructs of `abstract` (in layout `src`) in layout `dst`; a slot leaf is read whole on every
    device of its layer-layout leaf's sharding (leading slot dims unsplit), only to be converted."""
    def one(kind, s):
        shape = tuple(s.shape)
        if src is not None:  # back to [L, ...]
            shape = ((src[kind] >= 0).sum(),) + shape[3:]
        sh = s.sharding
        spec = tuple(None if a == "stage" else a for a in sh.spec) if isinstance(sh, NamedSharding) else None
        if src is not None and spec is not None:
            spec = (None,) + spec[3:]
        if dst is not None:
            shape = tuple(dst[kind].shape) + shape[1:]
            spec = None if spec is None else (None, None) + spec
        if spec is not None:
            sh = NamedSharding(sh.mesh, P(*spec))
        return jax.ShapeDtypeStruct(shape, s.dtype, sharding=sh)

    return _slotted_entries(abstract, one)


def restore_target(abstract: dict, mine: dict | None, meta: dict):
    """The restore target for a state wanted as `abstract` in layout `mine` from a checkpoint whose meta is
    `meta`: `abstract` itself when the layouts agree, else a `Reshaped` that reads the saved layout and converts
    (under jit, onto `abstract`'s shardings)."""
    saved = saved_index(meta)
    if same(saved, mine):
        return abstract
    abstract = jax.tree.map(abstract_leaf, abstract)  # every leaf with a sharding (the first device's if none)
    read = _abstract_in(abstract, mine, saved)
    shardings = jax.tree.map(lambda s: s.sharding, abstract)
    convert = jax.jit(lambda st: relayout(st, saved, mine), out_shardings=shardings)
    return Reshaped(read, convert)
