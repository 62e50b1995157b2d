"""The train state of a scheduled pipeline in the slot layout, and its checkpoints.

Under a scheduled pipeline (`executor.py`) train.py keeps the layer stacks of the parameters and of the
optimizer state in the program's slot layout, so a device stores only its own stage's layers and the step hands
them to the program as they are. A stack's slots ([S, v, k]: chunk c of stage s holds k slots, `index[s, c, j]`
the layer in slot j, -1 for none) come in two parts:

    resident  the first r slots of every chunk: held [S, v, r, ...] with dim 0 on 'stage'. A stage with fewer
              than r layers of the kind pads (a "ghost" slot: a copy of layer 0, run masked, never read back).
    pool      the layers in the other slots: held [P, ...] split over 'stage' on one of the layer's own dims
              (`pool_spec`), so each device stores 1/S of each, and borrowed whole by their stage for the step
              (`executor.py`: one all-to-all over 'stage' in, its transpose for the gradients out).

r is chosen per kind by `stage_layout.StageLayout.resident_slots` (least memory with the ghosts under 2% of the
model); V3 over 16 stages: 1 resident MoE slot, 42 MoE and the 3 dense layers pooled, no ghosts. (A pool leaf with
no dim to split would be held whole on every stage; the dry run counts that as ghosts too, none in the shipped
configs.)

    layer layout   params["moe_layers"]...w             [L, ...]            (the model's, and every reader's)
    slot layout    params["moe_layers"]["slots"]...w    [S, v, r, ...]      slot (s, c, j) holds index[s, c, j]
                   params["moe_layers"]["pool"]...w     [P, ...]            the layers `StackLayout.pooled`

The parts outside the stacks (embedding, final norm, head, MTP modules) keep their shape and are stored split
over 'stage' as well (`end_spec`: 1/S per device, with their AdamW moments; the program gathers them at the start
of the step). The router biases ([L, E]) stay replicated.

Checkpoints are written as the state is, with the layout in the step's JSON meta (`META_KEY`), and every restore
converts when the reader's layout differs (`restore_target`): train.py resuming with another stage count or
without a pipeline, and infer.py / `load_trained`, which read the layer layout.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsv3_jax.cli import UserError
from dsv3_jax.io.checkpoint import Reshaped, abstract_leaf

META_KEY = "pipeline_layout"
OLD_META_KEY = "pipeline_slots"  # the first slot layout (every slot resident, empty ones padded): not read
STACKS = {"dense_layers": "dense", "moe_layers": "moe"}  # state key of a stack -> its kind
SLOTTED = ("params", "opt_state")  # the entries of the train state held in the slot layout


@dataclasses.dataclass(frozen=True, eq=False)
class StackLayout:
    """Where one stack's layers live in the slot layout: `index` [S, v, k] (layer per slot, -1 none) and the
    `resident` slots per chunk (`stage_layout.StageLayout.resident_slots`); the other slots' layers are pooled."""

    index: np.ndarray
    resident: int


    @property
    def layers(self) -> int:
        return int((self.index >= 0).sum())

    @property
    def pooled(self) -> np.ndarray:
        """The pooled layers' ids, in pool order."""
        rest = self.index[:, :, self.resident:]
        return np.sort(rest[rest >= 0])

    @property
    def borrow(self) -> np.ndarray:
        """[S, v, k - r]: the pool position of the layer in each non-resident slot, -1 for an empty slot."""
        rest = self.index[:, :, self.resident:]
        return np.where(rest >= 0, np.searchsorted(self.pooled, rest), -1)

    def to_json(self) -> dict:
        return {"index": self.index.tolist(), "resident": self.resident}

    @classmethod
    def from_json(cls, d) -> StackLayout:
        return cls(np.asarray(d["index"], np.int64), int(d["resident"]))

    def __eq__(self, other):
        return (isinstance(other, StackLayout) and self.resident == other.resident
                and np.array_equal(self.index, other.index))

    __hash__ = None


def _is_stack_dict(x) -> bool:
    return isinstance(x, dict) and any(k in STACKS for k in x)


def _map_stacks(tree, fn):
    """fn(kind, subtree) on every layer stack's subtree (the value under 'dense_layers' / 'moe_layers', at any
    depth: params, or the AdamW moments that mirror them), the rest as it is."""
    def one(x):
        if not _is_stack_dict(x):
            return x
        return {k: (fn(STACKS[k], v) if k in STACKS else v) for k, v in x.items()}

    return jax.tree.map(one, tree, is_leaf=_is_stack_dict)


def _slotted_entries(state: dict, fn) -> dict:
    """fn(kind, subtree) on the stacks of the entries of a train state held in the slot layout."""
    return {k: (_map_stacks(v, fn) if k in SLOTTED else v) for k, v in state.items()}


def gather_slots(tree, index: np.ndarray):
    """A stack's [L, ...] leaves at every slot: [S, v, k, ...] (an empty slot gets layer 0's values; the program
    masks it). For what every stage reads whole anyway (the router biases)."""
    idx = np.maximum(index, 0)
    return jax.tree.map(lambda a: a[idx], tree)


def stack_to_slots(tree, lay: StackLayout) -> dict:
    """One stack's [L, ...] leaves -> {'slots': [S, v, r, ...], 'pool': [P, ...]} (a part with nothing in it is
    left out)."""
    out = {}
    if lay.resident:  # (an empty resident slot, padding, holds a copy of layer 0: finite, never read back)
        out["slots"] = jax.tree.map(lambda a: a[np.maximum(lay.index[:, :, :lay.resident], 0)], tree)
    if len(lay.pooled):
        out["pool"] = jax.tree.map(lambda a: a[lay.pooled], tree)
    return out


def stack_from_slots(held: dict, lay: StackLayout, layers: int | None = None):
    """One stack in the slot layout (parameters, moments or gradients) -> its [L, ...] leaves."""
    ids, parts = [], []
    if "slots" in held:
        ids.append(lay.index[:, :, :lay.resident].reshape(-1))
        parts.append(jax.tree.map(lambda a: a.reshape((-1,) + a.shape[3:]), held["slots"]))
    if "pool" in held:
        ids.append(lay.pooled)
        parts.append(held["pool"])
    ids = np.concatenate(ids)
    real = np.nonzero(ids >= 0)[0]
    order = real[np.argsort(ids[real])]
    assert (ids[order] == np.arange(len(order))).all() and layers in (None, len(order)), \
        "a layer is held by no slot or by two"
    return jax.tree.map(lambda *xs: jax.numpy.concatenate(xs)[order], *parts)


def to_slots(state: dict, layout: dict) -> dict:
    """Layer layout -> slot layout (`layout`: {kind: StackLayout})."""
    return _slotted_entries(state, lambda kind, t: stack_to_slots(t, layout[kind]))


def to_layers(state: dict, layout: dict) -> dict:
    """Slot layout -> layer layout."""
    return _slotted_entries(state, lambda kind, t: stack_from_slots(t, layout[kind]))


def relayout(state: dict, src: dict | None, dst: dict | None) -> dict:
    """From layout `src` to layout `dst` (None: the layer layout)."""
    if src is not None:
        state = to_layers(state, src)
    return state if dst is None else to_slots(state, dst)


def _unstaged(ax):
    """A spec entry without 'stage'."""
    if isinstance(ax, tuple):
        ax = tuple(a for a in ax if a != "stage")
        return ax if len(ax) > 1 else (ax[0] if ax else None)
    return None if ax == "stage" else ax


def slot_spec(spec: P) -> P:
    """A stack leaf's layer-layout spec ('layers' axis first) -> its resident slots' spec: [S, v, r] with S on
    'stage', the rest as before (never on 'stage' again)."""
    return P("stage", None, None, *(_unstaged(a) for a in tuple(spec)[1:]))


def pool_spec(shape, spec, sizes: dict) -> P:
    """A stack leaf's layer-layout spec -> its pool's ([P, ...]): 'stage' on the layer dim with the most elements
    that divides by the stages times the axes already on it, preferring a dim no other axis splits; 'stage'
    goes first on a dim it shares, so stage s holds one contiguous block of it. No such dim: held whole."""
    rest = [_unstaged(a) for a in tuple(spec)[1:]]
    rest += [None] * (len(shape) - 1 - len(rest))
    S = sizes.get("stage", 1)

    def axes(d):
        a = rest[d]
        return () if a is None else (a if isinstance(a, tuple) else (a,))

    fits = [d for d, n in enumerate(shape[1:]) if n % (S * math.prod(sizes[a] for a in axes(d))) == 0]
    if S > 1 and fits:
        d = max(fits, key=lambda i: (not axes(i), shape[1 + i]))
        rest[d] = ("stage",) + axes(d) if axes(d) else "stage"
    return P(None, *rest)


def pool_split_dim(spec: P) -> int | None:
    """The dim of a pool leaf that 'stage' splits (None: held whole)."""
    for i, ax in enumerate(tuple(spec)):
        if ax == "stage" or (isinstance(ax, tuple) and "stage" in ax):
            return i
    return None


def end_spec(shape, spec, sizes: dict) -> P:
    """A parameter outside the stacks (embedding, final norm, head, MTP modules): stored split over 'stage' too,
    on its largest dim that divides by the stages times the axes already there (each device keeps 1/S of it;
    the program gathers it whole at the start of the step, see `executor.value_and_grad`), else as the
    rules table says. Without this every stage group would store, and update, a whole copy."""
    spec = [_unstaged(a) for a in tuple(spec)] + [None] * (len(shape) - len(tuple(spec)))
    S = sizes.get("stage", 1)

    def axes(d):
        a = spec[d]
        return () if a is None else (a if isinstance(a, tuple) else (a,))

    fits = [d for d, n in enumerate(shape) if n % (S * math.prod(sizes[a] for a in axes(d))) == 0]
    if S > 1 and fits:
        d = max(fits, key=lambda i: shape[i])
        spec[d] = axes(d) + ("stage",) if axes(d) else "stage"
    return P(*spec)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def stack_specs(lay: StackLayout, specs, shapes, sizes: dict) -> dict:
    """A stack's layer-layout specs (and ShapeDtypeStructs) -> its specs in the slot layout."""
    out = {}
    if lay.resident:
        out["slots"] = jax.tree.map(slot_spec, specs, is_leaf=_is_spec)
    if len(lay.pooled):
        out["pool"] = jax.tree.map(lambda sp, sh: pool_spec(sh.shape, sp, sizes), specs, shapes, is_leaf=_is_spec)
    return out


def slot_specs(state_specs: dict, shapes: dict, sizes: dict, layout: dict) -> dict:
    """PartitionSpecs of a train state's params and biases under a scheduled pipeline, from the rules table's
    (`shapes`: the same trees of ShapeDtypeStructs, `sizes`: the mesh, `layout`: {kind: StackLayout}): the
    stacks in the slot layout, the other parameters split over 'stage' as well (`end_spec`), the router biases
    ([L, E]) replicated over it."""
    params = {}
    for key, sp in state_specs["params"].items():
        sh = shapes["params"][key]
        if key in STACKS:
            params[key] = stack_specs(layout[STACKS[key]], sp, sh, sizes)
        else:
            params[key] = jax.tree.map(lambda s, x: end_spec(x.shape, s, sizes), sp, sh, is_leaf=_is_spec)
    biases = jax.tree.map(lambda sp: P(*(_unstaged(a) for a in tuple(sp))), state_specs["biases"],
                          is_leaf=_is_spec)
    return {"params": params, "biases": biases}


def save_meta(layout: dict | None) -> dict:
    """The checkpoint meta entry for a state in `layout` ({} for the layer layout)."""
    return {} if layout is None else {META_KEY: {k: v.to_json() for k, v in layout.items()}}


def saved_layout(meta: dict) -> dict | None:
    """The slot layout a checkpoint was written in (None: the layer layout)."""
    if meta.get(OLD_META_KEY):
        raise UserError("this checkpoint holds the first pipeline slot layout (every slot on its stage, empty ones "
                        "padded), which this version does not read: resume or export it with the dsv3_jax version "
                        "that wrote it, or train from the start")
    got = meta.get(META_KEY)
    return None if not got else {k: StackLayout.from_json(v) for k, v in got.items()}


def same(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def _respec(s, shape, entries):
    """A ShapeDtypeStruct of `shape` on `s`'s mesh with spec `entries` (`s`'s sharding if it has no mesh)."""
    sh = s.sharding
    if isinstance(sh, NamedSharding):
        sh = NamedSharding(sh.mesh, P(*entries))
    return jax.ShapeDtypeStruct(tuple(shape), s.dtype, sharding=sh)


def _rest(s, lead: int) -> tuple:
    """The spec entries of a leaf's layer dims (after `lead` slot dims), without 'stage'."""
    spec = tuple(s.sharding.spec) if isinstance(s.sharding, NamedSharding) else ()
    spec = spec + (None,) * (len(s.shape) - len(spec))
    return tuple(_unstaged(a) for a in spec[lead:])


def _abstract_in(abstract: dict, src: dict | None, dst: dict | None) -> dict:
    """The ShapeDtypeStructs of `abstract` (in layout `src`) in layout `dst`: a stack leaf is read whole on every
    device of its layer-layout sharding (slot and pool dims unsplit), only to be converted."""
    def one(kind, sub):
        lay = None if src is None else src[kind]
        if lay is None:
            layers = jax.tree.map(lambda s: _respec(s, s.shape, (None,) + _rest(s, 1)), sub)
        else:
            part, lead = ("slots", 3) if "slots" in sub else ("pool", 1)
            layers = jax.tree.map(lambda s: _respec(s, (lay.layers,) + s.shape[lead:], (None,) + _rest(s, lead)),
                                  sub[part])
        if dst is None:
            return layers
        lay, out = dst[kind], {}
        if lay.resident:
            out["slots"] = jax.tree.map(lambda s: _respec(s, (*lay.index.shape[:2], lay.resident) + s.shape[1:],
                                                          (None, None, None) + _rest(s, 1)), layers)
        if len(lay.pooled):
            out["pool"] = jax.tree.map(lambda s: _respec(s, (len(lay.pooled),) + s.shape[1:], (None,) + _rest(s, 1)),
                                       layers)
        return out

    return _slotted_entries(abstract, one)


def restore_target(abstract: dict, mine: dict | None, meta: dict):
    """The restore target for a state wanted as `abstract` in layout `mine` from a checkpoint whose meta is
    `meta`: `abstract` itself when the layouts agree, else a `Reshaped` that reads the saved layout and converts
    (under jit, onto `abstract`'s shardings)."""
    saved = saved_layout(meta)
    if same(saved, mine):
        return abstract
    abstract = jax.tree.map(abstract_leaf, abstract)  # every leaf with a sharding (the first device's if none)
    read = _abstract_in(abstract, mine, saved)
    shardings = jax.tree.map(lambda s: s.sharding, abstract)
    convert = jax.jit(lambda st: relayout(st, saved, mine), out_shardings=shardings)
    return Reshaped(read, convert)
