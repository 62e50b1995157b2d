"""Pipeline schedules as op lists, and the timeline they execute: bubble and live activations, counted.

Shape legend: S stages, M micro-batches, v chunks per stage (interleaved: virtual stage k = c * S + s runs
on stage s = k % S, chunk c = k // S; a micro-batch passes virtual stages 0 .. v*S - 1 in order).

An op is (kind, micro-batch, chunk), kind one of
    'F'  forward of a micro-batch through one (virtual) stage
    'B'  backward: the input gradient, and the weight gradient too unless the schedule splits it off
    'W'  the weight gradient alone (zero-bubble schedules split B into B and W, W free to move later)
Each stage runs its ops in list order, one at a time; an op also waits for its data: F(m) at virtual stage
k for F(m) at k - 1; B(m) at k for B(m) at k + 1 (the last virtual stage: for its own F(m)); W(m) for B(m)
on the same stage. `simulate` places every op at its earliest start under those two rules, with op costs
(default F = B = W = 1, and an unsplit B = B + W), and counts

    bubble       idle stage-time / all stage-time, over the makespan       (what the schedule wastes)
    peak_live    per stage, the most micro-batches whose activations are held at once: F done, and the
                 op that frees them (B, or W when split) not yet done; chunks count 1/v each

The schedules (per stage s; `orders(name, S, M, v)`):
  gpipe        all F (m = 0..M-1), then all B (reverse order)         bubble (S-1)/(M+S-1), live M
  1f1b         S-s-1 warm-up F, then one F / one B alternately,       bubble (S-1)/(M+S-1), live <= S - s
               then the remaining B (PipeDream-flush)
  interleaved  1f1b over v chunks per stage (Megatron's order:        bubble (S-1)/(v*M+S-1), live <= S
               groups of S micro-batches per chunk; M % S == 0)        (+ (v-1) chunk warm-up)
  zb_h1        B split into B and W; list scheduling: the op that     bubble 2(S-1)/(3M+2(S-1)) at F=B=W
               starts earliest, B before F before W, an F only while  (idle (S-1)(F+B), 1f1b's (S-1)(F+B+W)),
               fewer than S - s micro-batches are in flight (until W)  live <= S - s
Tick diagrams: see `diagram` (README and the tests print them for S = 4, M = 8).
"""
from __future__ import annotations

import dataclasses

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb_h1")


@dataclasses.dataclass(frozen=True)
class Op:
    kind: str  # 'F' | 'B' | 'W'
    micro: int
    chunk: int = 0


def _gpipe(S, M, v):
    return [[Op("F", m) for m in range(M)] + [Op("B", m) for m in reversed(range(M))] for _ in range(S)]


def _one_f_one_b(S, M, v):
    out = []
    for s in range(S):
        warm = min(S - s - 1, M)
        ops = [Op("F", m) for m in range(warm)]
        f, b = warm, 0
        while f < M:
            ops += [Op("F", f), Op("B", b)]
            f, b = f + 1, b + 1
        ops += [Op("B", m) for m in range(b, M)]
        out.append(ops)
    return out


def _interleaved(S, M, v):
    if M % S:
        raise ValueError(f"interleaved schedule: micro-batches ({M}) must be a multiple of the stages ({S})")
    total = M * v

    def fwd(i):  # the i-th forward of a stage: groups of S micro-batches per chunk
        return Op("F", (i // (S * v)) * S + i % S, (i // S) % v)

    def bwd(i):
        return Op("B", (i // (S * v)) * S + i % S, v - 1 - (i // S) % v)

    out = []
    for s in range(S):
        warm = min((S - s - 1) * 2 + (v - 1) * S, total)
        ops = [fwd(i) for i in range(warm)]
        f, b = warm, 0
        while f < total:
            ops += [fwd(f), bwd(b)]
            f, b = f + 1, b + 1
        ops += [bwd(i) for i in range(b, total)]
        out.append(ops)
    return out


def _zb_h1(S, M, v):
    """List scheduling (unit costs) over the dependency rules: at each step the op that can start earliest,
    ties broken B, then F, then W; an F only while fewer than S - s micro-batches are in flight (F done, W not
    done: 1f1b's activation memory, counted until the weight gradient that still reads them)."""
    f_done = [[None] * M for _ in range(S)]  # finish times
    b_done = [[None] * M for _ in range(S)]
    clock = [0] * S
    nxt = {"F": [0] * S, "B": [0] * S, "W": [0] * S}
    out = [[] for _ in range(S)]
    for _ in range(3 * S * M):
        best = None  # ((start, priority, stage), stage, op)
        for s in range(S):
            cands = []
            m = nxt["B"][s]
            if m < M and f_done[s][m] is not None:
                dep = f_done[s][m] if s == S - 1 else b_done[s + 1][m]
                if dep is not None:
                    cands.append((max(clock[s], dep), 0, Op("B", m)))
            m = nxt["F"][s]
            if m < M and m - nxt["W"][s] < S - s:
                dep = 0 if s == 0 else f_done[s - 1][m]
                if dep is not None:
                    cands.append((max(clock[s], dep), 1, Op("F", m)))
            m = nxt["W"][s]
            if m < nxt["B"][s]:
                cands.append((max(clock[s], b_done[s][m]), 2, Op("W", m)))
            for start, prio, op in cands:
                if best is None or (start, prio, s) < best[0]:
                    best = ((start, prio, s), s, op)
        (start, _, _), s, op = best
        if op.kind == "F":
            f_done[s][op.micro] = start + 1
        elif op.kind == "B":
            b_done[s][op.micro] = start + 1
        nxt[op.kind][s] += 1
        clock[s] = start + 1
        out[s].append(op)
    return out


def orders(name: str, S: int, M: int, v: int = 1) -> list[list[Op]]:
    """Each stage's op list for schedule `name` (see the module docstring)."""
    if name not in SCHEDULES:
        raise ValueError(f"pipeline schedule {name!r}: choose from {SCHEDULES}")
    if name != "interleaved" and v != 1:
        raise ValueError(f"pipeline schedule {name!r} runs one chunk per stage (pipeline_chunks=1), got {v}")
    return {"gpipe": _gpipe, "1f1b": _one_f_one_b, "interleaved": _interleaved, "zb_h1": _zb_h1}[name](S, M, v)


def _costs(cost, split):
    c = {"F": 1.0, "B": 1.0, "W": 1.0} | (cost or {})
    if not split:
        c["B"] = c["B"] + c["W"]
    return c


@dataclasses.dataclass
class Timeline:
    S: int
    M: int
    v: int
    ops: list[list[tuple[float, float, Op]]]  # per stage: (start, end, op) in execution order
    makespan: float
    bubble: float
    peak_live: list[float]  # per stage, in micro-batches of one stage's activations


def simulate(stage_ops: list[list[Op]], M: int, v: int = 1, cost: dict | None = None) -> Timeline:
    """Place each op at its earliest start (stage free, data ready) and count bubble and live activations."""
    S = len(stage_ops)
    split = any(op.kind == "W" for ops in stage_ops for op in ops)
    c = _costs(cost, split)
    K = S * v
    done: dict[tuple, float] = {}  # (kind, micro, virtual stage) -> finish time
    pos = [0] * S
    clock = [0.0] * S
    placed: list[list[tuple[float, float, Op]]] = [[] for _ in range(S)]
    total = sum(map(len, stage_ops))
    while sum(pos) < total:
        progressed = False
        for s in range(S):
            while pos[s] < len(stage_ops[s]):
                op = stage_ops[s][pos[s]]
                k = op.chunk * S + s
                if op.kind == "F":
                    dep = ("F", op.micro, k - 1) if k > 0 else None
                elif op.kind == "B":
                    dep = ("B", op.micro, k + 1) if k < K - 1 else ("F", op.micro, k)
                else:
                    dep = ("B", op.micro, k)
                if dep is not None and dep not in done:
                    break
                start = max(clock[s], done[dep] if dep else 0.0)
                end = start + c[op.kind] / v  # a chunk holds 1/v of the stage's layers
                done[(op.kind, op.micro, k)] = end
                clock[s] = end
                placed[s].append((start, end, op))
                pos[s] += 1
                progressed = True
        if not progressed:
            raise ValueError("pipeline schedule deadlocks: an op waits for data its producer never computes")
    makespan = max(clock)
    busy = sum(e - b for ops in placed for b, e, _ in ops)
    peak = []
    for s in range(S):
        live, best = 0.0, 0.0
        frees = "W" if split else "B"
        for _, _, op in placed[s]:  # in execution order: F holds, the freeing op releases
            live += (1.0 / v) if op.kind == "F" else (-1.0 / v) if op.kind == frees else 0.0
            best = max(best, live)
        peak.append(best)
    return Timeline(S, M, v, placed, makespan, 1.0 - busy / (S * makespan), peak)


def bubble_formula(name: str, S: int, M: int, v: int = 1) -> float:
    """The closed form at F = B = W: GPipe/1F1B (S-1)/(M+S-1), interleaved (S-1)/(vM+S-1), ZB-H1 under
    1f1b's memory 2(S-1)/(3M+2(S-1)) (the ZB paper's (S-1)/(3M+S-1) needs up to 2S-1 micro-batches live)."""
    if name in ("gpipe", "1f1b"):
        return (S - 1) / (M + S - 1)
    if name == "interleaved":
        return (S - 1) / (v * M + S - 1)
    if name == "zb_h1":  # idle (S-1)(F+B) against 1f1b's (S-1)(F+B+W): W leaves the critical path
        return 2 * (S - 1) / (3 * M + 2 * (S - 1))
    raise ValueError(name)


def diagram(t: Timeline, width: int = 120) -> str:
    """One line per stage, one character per op tick (1/v of a stage's F): F of micro-batch m as the digit m,
    B as the letter A + m, W as a + m (m mod 10 / 26), '.' idle."""
    lines = []
    for s, ops in enumerate(t.ops):
        row = ["."] * int(round(t.makespan * t.v))
        for b, e, op in ops:
            ch = {"F": str(op.micro % 10), "B": chr(65 + op.micro % 26), "W": chr(97 + op.micro % 26)}[op.kind]
            for i in range(int(round(b * t.v)), int(round(e * t.v))):
                row[i] = ch
        lines.append(f"s{s} " + "".join(row)[:width])
    return "\n".join(lines)
