"""Pipeline schedules as lockstep tick tables: what the one SPMD program runs, and its bubble, counted.

Shape legend: S stages, M micro-batches, v chunks per stage; K = S * v virtual stages, virtual stage
k = c * S + s running on stage s = k % S as its chunk c = k // S (contiguous layers of the model: a
micro-batch passes virtual stages 0 .. K-1 in order, so with v > 1 it goes round the stages v times).

One SPMD program runs every stage in lockstep: in each tick a stage runs at most one forward (F: one
micro-batch through one chunk) and then at most one backward (B: the chunk's input and weight gradients
for one micro-batch), and at the end of the tick the F outputs move one virtual stage on and the B input
gradients one back (`lax.ppermute` over 'stage'; from the last stage to the first between chunks). A
schedule is the tick of every op:

  gpipe        f(m, k) = m + k                     all F, then all B in mirror order:
               b(m, k) = (M + K - 1) + (M - 1 - m) + (K - 1 - k)
  1f1b         f(m, k) = m + k                     each micro-batch's B starts on the last stage in the tick
               b(m, k) = f(m, K - 1) + (K - 1 - k)  of its F, so F and B alternate from then on and a stage
                                                   holds at most 2(S - s) - 1 micro-batches (GPipe: all M)
  interleaved  v chunks per stage, 1f1b order:     micro-batches enter in groups of S (M % S == 0); group g,
               f(m, k) = g S v + c S + r + s        r = m % S; chunk c of stage s holds virtual stage cS + s
               b(m, k) = f(m, K - 1) + (K - 1 - k)

The bubble is counted from the table: each tick lasts as long as its busiest stage (F costs `cost['F']`,
B `cost['B']`, a chunk's op 1/v of that), and bubble = idle stage-time / all stage-time. Closed forms at
any costs: gpipe and 1f1b (S-1)/(M+S-1); interleaved (S-1)/(vM+S-1) -- `bubble_formula`; the tests check the
count against them. Live activations: a stage keeps each micro-batch's chunk input from its F to its B (the
B recomputes the chunk's forward from it, see executor.py), counted by `peak_live` in held chunk inputs
(each one activation [b, T, D] of a micro-batch).

Tick diagrams of each schedule: `diagram`, drawn for S = 4, M = 8 in the package's docstring (`__init__.py`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dsv3_jax.cli import UserError

SCHEDULES = ("gpipe", "1f1b", "interleaved")
FIELDS = ("f_valid", "f_micro", "f_chunk", "f_slot", "f_dyslot", "b_valid", "b_micro", "b_chunk", "b_xslot",
          "b_dyslot", "recv_f", "recv_b")


def op_ticks(name: str, S: int, M: int, v: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(f, b): the tick of the F and of the B of micro-batch m at virtual stage k, each [M, S*v]."""
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule {name!r}: choose from {SCHEDULES}")
    if name != "interleaved" and v != 1:
        raise ValueError(f"pipeline schedule {name!r} runs one chunk per stage (pipeline_chunks=1), got {v}")
    if name == "interleaved" and M % S:
        raise ValueError(f"interleaved schedule: micro-batches ({M}) must be a multiple of the stages ({S})")
    K = S * v
    m = np.arange(M)[:, None]
    k = np.arange(K)[None, :]
    if name == "interleaved":
        f = (m // S) * S * v + (k // S) * S + m % S + k % S
    else:
        f = m + k
    if name == "gpipe":
        b = (M + K - 1) + (M - 1 - m) + (K - 1 - k)
    else:
        b = f[:, K - 1:K] + (K - 1 - k)
    return f.astype(np.int64), b.astype(np.int64)


@dataclasses.dataclass
class TickTable:
    """Per tick and stage, what to run (`FIELDS`, int32 arrays [ticks, S]; -1 / 0 where nothing):
    f_valid, f_micro, f_chunk   the F of this tick; f_slot the activation slot holding its input (the first
                                virtual stage writes the embedding there); f_dyslot where the last virtual
                                stage puts the loss gradient
    b_valid, b_micro, b_chunk   the B; b_xslot / b_dyslot the slots of its input and its output gradient
    recv_f / recv_b             the slot an activation / gradient arriving at the end of the tick goes to
    Slots are reused once their B is done: `x_slots` / `dy_slots` are the buffer sizes."""

    name: str
    S: int
    M: int
    v: int
    arrays: dict
    x_slots: int
    dy_slots: int
    bubble: float
    peak_live: list

    @property
    def ticks(self) -> int:
        return int(self.arrays["f_valid"].shape[0])


def table(name: str, S: int, M: int, v: int = 1, cost: dict | None = None) -> TickTable:
    """The tick table of schedule `name`, its buffer slots, its bubble and live activations (see the module
    docstring). `cost`: relative op costs, default F 1, B 2."""
    c = {"F": 1.0, "B": 2.0} | (cost or {})
    f, b = op_ticks(name, S, M, v)
    K = S * v
    T = int(b.max()) + 1
    arr = {n: np.full((T, S), 0 if n.endswith("valid") else -1, np.int32) for n in FIELDS}
    free_x, free_dy = [[] for _ in range(S)], [[] for _ in range(S)]
    n_x, n_dy = [0] * S, [0] * S
    x_slot, dy_slot = {}, {}

    def take(free, count, s):
        if free[s]:
            return free[s].pop()
        count[s] += 1
        return count[s] - 1

    f_at = {(int(f[m, k]), k % S): (m, k) for m in range(M) for k in range(K)}
    b_at = {(int(b[m, k]), k % S): (m, k) for m in range(M) for k in range(K)}
    if len(f_at) != M * K or len(b_at) != M * K:
        raise AssertionError(f"schedule {name}: two ops of one kind on a stage in one tick")
    live, peak = [0.0] * S, [0.0] * S
    busy = span = 0.0
    for t in range(T):
        arrive_f, arrive_b, release = [], [], []
        work = [0.0] * S
        for s in range(S):
            if (t, s) in f_at:
                m, k = f_at[(t, s)]
                assert k == 0 or f[m, k - 1] < t
                if k == 0:
                    x_slot[(m, k)] = take(free_x, n_x, s)
                arr["f_valid"][t, s], arr["f_micro"][t, s], arr["f_chunk"][t, s] = 1, m, k // S
                arr["f_slot"][t, s] = x_slot[(m, k)]
                live[s] += 1.0
                peak[s] = max(peak[s], live[s])
                work[s] += c["F"] / v
                if k == K - 1:
                    dy_slot[(m, k)] = take(free_dy, n_dy, s)
                    arr["f_dyslot"][t, s] = dy_slot[(m, k)]
                else:
                    arrive_f.append((m, k + 1))
            if (t, s) in b_at:
                m, k = b_at[(t, s)]
                assert (f[m, k] <= t) if k == K - 1 else (b[m, k + 1] < t)
                arr["b_valid"][t, s], arr["b_micro"][t, s], arr["b_chunk"][t, s] = 1, m, k // S
                arr["b_xslot"][t, s], arr["b_dyslot"][t, s] = x_slot[(m, k)], dy_slot[(m, k)]
                work[s] += c["B"] / v
                release.append((m, k))
                if k > 0:
                    arrive_b.append((m, k - 1))
        for m, k in release:  # end of tick: finished micro-batches free their slots, arrivals take slots
            s = k % S
            free_x[s].append(x_slot.pop((m, k)))
            free_dy[s].append(dy_slot.pop((m, k)))
            live[s] -= 1.0
        for m, k in arrive_f:
            x_slot[(m, k)] = take(free_x, n_x, k % S)
            arr["recv_f"][t, k % S] = x_slot[(m, k)]
        for m, k in arrive_b:
            dy_slot[(m, k)] = take(free_dy, n_dy, k % S)
            arr["recv_b"][t, k % S] = dy_slot[(m, k)]
        busy += sum(work)
        span += (c["F"] / v if arr["f_valid"][t].any() else 0.0) + (c["B"] / v if arr["b_valid"][t].any() else 0.0)
    return TickTable(name, S, M, v, arr, max(n_x), max(n_dy), 1.0 - busy / (S * span), peak)


def bubble_formula(name: str, S: int, M: int, v: int = 1) -> float:
    """Closed forms: gpipe and 1f1b (S-1)/(M+S-1), interleaved (S-1)/(vM+S-1)."""
    if name in ("gpipe", "1f1b"):
        return (S - 1) / (M + S - 1)
    if name == "interleaved":
        return (S - 1) / (v * M + S - 1)
    raise ValueError(name)


def diagram(t: TickTable, width: int = 200) -> str:
    """One line per stage, one two-character cell per tick: the F's micro-batch as a digit (m mod 10) or '.',
    then the B's as a letter (A + m) or '.'."""
    a = t.arrays
    lines = []
    for s in range(t.S):
        cells = [(str(a["f_micro"][k, s] % 10) if a["f_valid"][k, s] else ".")
                 + (chr(65 + a["b_micro"][k, s] % 26) if a["b_valid"][k, s] else ".") for k in range(t.ticks)]
        lines.append(f"s{s} " + " ".join(cells)[:width])
    return "\n".join(lines)


def check_microbatches(batch: int, microbatches: int, data_shards: int) -> None:
    """Every micro-batch must split evenly over the data shards (data x fsdp x expert)."""
    if microbatches < 1 or batch % microbatches or (batch // microbatches) % data_shards:
        raise UserError(f"config.mesh.microbatches={microbatches}: the batch of {batch} sequences must split into "
                        f"that many micro-batches, each divisible by data x fsdp x expert = {data_shards}; choose "
                        f"microbatches so that batch_size is a multiple of microbatches x {data_shards}.")
