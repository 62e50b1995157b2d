"""Which layers each pipeline stage holds: contiguous runs of any layer kinds, split unevenly where the counts
do not divide, balanced by a cost model (or given by the user), with the padding it needs counted.

A model is a sequence of blocks (`first_k_dense_replace` dense, then MoE), the embedding before them and the
final norm, head and MTP modules after them. Stage s holds blocks [bounds[s], bounds[s+1]); stage 0 also the
embedding, the last stage also the head and the MTP modules. Costs are forward FLOPs per token counted from
the model's own parameter tree (matmul parameters used per token, routed experts at K/E, x2) plus the
attention scores at the sequence length (causal: T/2 keys on average):

    block   2 * active params of the block + 2 * N * (dqk + dv) * T / 2
    head    2 * D * V   (embedding lookups cost nothing)
    MTP     its own block + eh_proj + the shared head, per module

`balanced(costs, S)` minimises the largest stage cost over all contiguous splits (exact, dynamic programming),
then, among the splits with that maximum, the padding slots (below). `config.mesh.pipeline_stage_layers`
("3,4,4,...") gives the split instead.

Slots. One SPMD program runs the same slots on every stage: slots(kind) = the most blocks of that kind any stage
holds; a stage with fewer runs its remaining slots masked. Of these, the first `resident_slots[kind]` are stored on
each stage ([S, v, r] arrays, `slot_state.py`); the blocks in the other slots (`pooled_blocks`) are stored split
over 'stage' (1/S per device) and borrowed whole by their stage for the step. A resident slot a stage cannot fill
is padding ("ghost" parameters, `ghost_params`); a pooled block costs no padding but a whole copy, with its gradient
sums, during the step (`borrowed_slots`). `resident_slots` picks, per kind, the count that needs the least memory
per device (parameters, gradients and AdamW moments stored, plus what is borrowed) with the ghosts under
GHOST_BUDGET of the model. DeepSeek-V3 over 16 stages (stage 0: embedding, the 3 dense and 1 MoE layer; 14 stages
of 4 MoE layers; the last: 1 MoE layer, head and MTP): 1 resident MoE slot, no ghosts, the 3 dense and 42 MoE
blocks pooled (a second resident slot would pad 2 stages: 3.4%). Against resident slots padded to 4 MoE and 3 dense
per stage (95.3B ghosts, 14.0%) this stores 6.5 instead of 13.2 GiB of parameters per device and borrows 11.1.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

from flax import nnx

from dsv3_jax import param_kinds
from dsv3_jax.cli import ConfigError

GHOST_BUDGET = 0.02  # of the model's parameters: the most padding a layout stores to keep blocks resident


@dataclasses.dataclass(frozen=True)
class LayerCosts:
    """Per-block kinds, forward FLOPs per token and parameters; the extra cost of the first and last stage."""

    kinds: tuple[str, ...]  # 'dense' | 'moe', in model order
    flops: tuple[float, ...]
    params: dict  # kind -> parameters of one block of that kind
    first_extra: float  # embedding
    last_extra: float  # final norm, head, MTP modules
    total_params: int  # main model + MTP modules


def layer_costs(model, seq_len: int) -> LayerCosts:
    """From a (possibly abstract) `DeepSeekV3`: each block's kind, FLOPs per token and parameter count."""
    cfg = model.cfg
    K, E = cfg.num_experts_per_tok, max(cfg.n_routed_experts, 1)
    per_kind = {"dense": [0, 0], "moe": [0, 0]}  # [params of the stack, active params of the stack]
    mtp_active = total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = math.prod(int(d) for d in var.get_value().shape)
        total += n
        names = param_kinds.path_names(path)
        active = n * K // E if param_kinds.param_kind(path) == "routed_experts" else n
        if param_kinds.in_mtp(path):
            mtp_active += active if param_kinds.param_kind(path) != "norms" else 0
        elif names[0] in ("dense_layers", "moe_layers"):
            kind = "dense" if names[0] == "dense_layers" else "moe"
            per_kind[kind][0] += n
            per_kind[kind][1] += active
    attn = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    counts = {"dense": cfg.num_dense_layers, "moe": cfg.num_moe_layers}
    kinds = ("dense",) * counts["dense"] + ("moe",) * counts["moe"]
    flops = tuple(2 * per_kind[k][1] / counts[k] + attn for k in kinds)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    mtp = 2 * mtp_active + len(model.mtp) * (head + attn)
    params = {k: per_kind[k][0] // max(counts[k], 1) for k in per_kind}
    return LayerCosts(kinds, flops, params, 0.0, head + mtp, total)


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """A split of the blocks into S contiguous stages and what it costs."""

    bounds: tuple[int, ...]  # S + 1 block indices, bounds[0] = 0, bounds[-1] = number of blocks
    costs: LayerCosts

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1

    def blocks(self, s: int) -> range:
        return range(self.bounds[s], self.bounds[s + 1])

    def count(self, s: int, kind: str) -> int:
        return sum(self.costs.kinds[i] == kind for i in self.blocks(s))

    def slots(self, kind: str) -> int:
        """Blocks of `kind` every stage has room for (the most any stage holds)."""
        return max(self.count(s, kind) for s in range(self.stages))

    def stage_cost(self, s: int) -> float:
        c = sum(self.costs.flops[i] for i in self.blocks(s))
        return c + (self.costs.first_extra if s == 0 else 0.0) + (self.costs.last_extra if s == self.stages - 1
                                                                  else 0.0)

    def imbalance(self, stages: int | None = None) -> float:
        """Largest stage cost over the mean: the pipeline runs at the pace of its slowest stage. With `stages`
        (< self.stages: the virtual stages of an interleaved layout), a stage's cost sums its chunks."""
        S = stages or self.stages
        costs = [sum(self.stage_cost(q) for q in range(s, self.stages, S)) for s in range(S)]
        return max(costs) / (sum(costs) / len(costs))

    def kinds(self) -> list[str]:
        return [k for k in ("dense", "moe") if k in self.costs.kinds]

    def ghost_blocks(self, kind: str, r: int | None = None) -> int:
        """Resident slots of `kind` some stage leaves empty (stored padding)."""
        r = self.resident_slots[kind] if r is None else r
        return sum(max(0, r - self.count(s, kind)) for s in range(self.stages))

    def pooled_blocks(self, kind: str, r: int | None = None) -> int:
        """Blocks of `kind` beyond the resident slots: held split over 'stage', borrowed by their stage."""
        r = self.resident_slots[kind] if r is None else r
        return sum(max(0, self.count(s, kind) - r) for s in range(self.stages))

    def borrowed_slots(self, kind: str) -> int:
        return self.slots(kind) - self.resident_slots[kind]

    def empty_slots(self, kind: str) -> int:
        """Slots some stage runs masked (no layer in them): S x slots - blocks of the kind."""
        n = sum(k == kind for k in self.costs.kinds)
        return self.stages * self.slots(kind) - n if n else 0

    def _state_params(self, kind: str, r: int) -> float:
        """Parameters' worth of train state per stage for `kind` with r resident slots: parameters, gradients and
        two AdamW moments of the resident slots and of a 1/S share of the pooled blocks, and the borrowed blocks
        with their gradient sums during the step."""
        n = self.costs.params[kind]
        return n * (4 * r + 4 * self.pooled_blocks(kind, r) / self.stages + 2 * (self.slots(kind) - r))

    @functools.cached_property
    def resident_slots(self) -> dict:
        """{kind: r}: the resident slot counts with the least train state per stage whose ghosts stay under
        GHOST_BUDGET of the model (more resident slots on a tie: less to move)."""
        kinds = self.kinds()
        ranges = [range(min(self.count(s, k) for s in range(self.stages)), self.slots(k) + 1) for k in kinds]
        best = None
        for rs in itertools.product(*ranges):
            ghosts = sum(self.ghost_blocks(k, r) * self.costs.params[k] for k, r in zip(kinds, rs))
            if ghosts > GHOST_BUDGET * self.costs.total_params and any(r > rg.start for r, rg in zip(rs, ranges)):
                continue
            key = (sum(self._state_params(k, r) for k, r in zip(kinds, rs)), -sum(rs))
            if best is None or key < best[0]:
                best = (key, dict(zip(kinds, rs)))
        return best[1]

    @property
    def ghost_params(self) -> int:
        return sum(self.ghost_blocks(k) * self.costs.params[k] for k in self.kinds())

    @property
    def pooled_params(self) -> int:
        return sum(self.pooled_blocks(k) * self.costs.params[k] for k in self.kinds())

    @property
    def state_params(self) -> float:
        return sum(self._state_params(k, self.resident_slots[k]) for k in self.kinds())

    def describe(self, s: int) -> str:
        """'layers 3-6 (4 moe)' and the embedding / head + MTP where the stage has them."""
        r = self.blocks(s)
        parts = []
        if s == 0:
            parts.append("embedding")
        if len(r):
            kinds = ", ".join(f"{self.count(s, k)} {k}" for k in ("dense", "moe") if self.count(s, k))
            parts.append(f"layers {r.start}-{r.stop - 1} ({kinds})" if len(r) > 1 else f"layer {r.start} ({kinds})")
        if s == self.stages - 1:
            parts.append("head + MTP")
        return ", ".join(parts)


def balanced(costs: LayerCosts, stages: int) -> StageLayout:
    """The contiguous split with the smallest largest stage cost; among those (within 0.1%), the most even costs
    (smallest sum of squares), then the least train state per stage (`_fewest_borrowed`)."""
    n = len(costs.kinds)
    if stages < 1:
        raise ConfigError(f"config.mesh.stage={stages} must be >= 1")  # (checked by the mesh parser first)
    if stages > n + 1:
        raise ConfigError(f"config.mesh.stage x config.mesh.pipeline_chunks = {stages} pipeline stages, but the model "
                          f"has {n} layers: more than {n + 1} stages leave one empty (lower either)")
    prefix = [0.0]
    for f in costs.flops:
        prefix.append(prefix[-1] + f)

    def cost(s, a, b):  # stage s holds blocks [a, b)
        c = prefix[b] - prefix[a]
        return c + (costs.first_extra if s == 0 else 0.0) + (costs.last_extra if s == stages - 1 else 0.0)

    @functools.cache
    def best(s, a):  # stages s.. over blocks a..n -> (max cost, bounds tail)
        if s == stages - 1:
            return cost(s, a, n), (n,)
        out = (math.inf, ())
        for b in range(a + 1, n + 1):  # stage s holds [a, b): at least one block (only the last may hold none:
            tail_cost, tail = best(s + 1, b)  # it carries the head and the MTP modules)
            cand = (max(cost(s, a, b), tail_cost), (b,) + tail)
            if out is None or cand[0] < out[0] - 1e-9:
                out = cand
        return out

    top, _ = best(0, 0)
    limit = top * 1.001

    @functools.cache
    def even(s, a):  # the split with every stage under `limit` and the smallest sum of squared stage costs
        if s == stages - 1:
            c = cost(s, a, n)
            return (c * c, (n,)) if c <= limit else (math.inf, ())
        out = (math.inf, ())
        for b in range(a + 1, n + 1):
            c = cost(s, a, b)
            if c > limit:
                break
            sq, tail = even(s + 1, b)
            if c * c + sq < out[0]:
                out = (c * c + sq, (b,) + tail)
        return out

    layout = StageLayout((0,) + even(0, 0)[1], costs)
    return _fewest_borrowed(layout, limit)


def _fewest_borrowed(layout: StageLayout, limit: float) -> StageLayout:
    """Local search: move single boundaries while the largest stage cost stays under `limit` and the train state
    per stage drops (then the pooled parameters, then the spread of block counts)."""
    def key(lay):
        counts = [len(lay.blocks(s)) for s in range(lay.stages)]
        return (lay.state_params, lay.pooled_params, max(counts) - min(counts))

    improved = True
    while improved:
        improved = False
        for i in range(1, layout.stages):
            for d in (-1, 1):
                b = list(layout.bounds)
                b[i] += d
                if not b[i - 1] <= b[i] <= b[i + 1]:
                    continue
                cand = StageLayout(tuple(b), layout.costs)
                if max(cand.stage_cost(s) for s in range(cand.stages)) <= limit and key(cand) < key(layout):
                    layout, improved = cand, True
    return layout


def given(costs: LayerCosts, stage_layers: str) -> StageLayout:
    """`config.mesh.pipeline_stage_layers` ("3,4,4,..."): blocks per stage, in order."""
    try:
        counts = [int(x) for x in str(stage_layers).split(",")]
    except ValueError:
        counts = None
    n = len(costs.kinds)
    if not counts or any(c < 0 for c in counts) or sum(counts) != n:
        raise ConfigError(f"config.mesh.pipeline_stage_layers={stage_layers!r}: give the layers of each stage as "
                          f"comma-separated counts that add up to the model's {n} layers (e.g. "
                          f"'{','.join(map(str, _even(n, 2)))}' for 2 stages)")
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return StageLayout(tuple(bounds), costs)


def _even(n, s):
    return [n // s + (i < n % s) for i in range(s)]


def plan(model, stages: int, seq_len: int, stage_layers: str = "") -> StageLayout:
    """The layout of `model` over `stages`: the user's split when given, else the balanced one."""
    costs = layer_costs(model, seq_len)
    if stage_layers:
        layout = given(costs, stage_layers)
        if layout.stages != stages:
            raise ConfigError(f"config.mesh.pipeline_stage_layers={stage_layers!r} names {layout.stages} stages "
                              f"but config.mesh.stage={stages}")
        return layout
    return balanced(costs, stages)


def slot_index(layout: StageLayout, stages: int, kind: str):
    """[S, v, k] int: which layer of the `kind` stack (its index in that stack) each slot of chunk c of stage s
    holds, from the front, -1 for an empty slot. `layout` splits the blocks over the K = S * v virtual stages
    (virtual stage c * S + s is chunk c of stage s)."""
    import numpy as np

    K = layout.stages
    v = K // stages
    first = layout.costs.kinds.index(kind) if kind in layout.costs.kinds else 0
    k = layout.slots(kind)
    out = np.full((stages, v, k), -1, np.int64)
    for q in range(K):
        ids = [i - first for i in layout.blocks(q) if layout.costs.kinds[i] == kind]
        out[q % stages, q // stages, :len(ids)] = ids
    return out
