"""Bubble and held activations of each pipeline schedule, counted from the tick tables the SPMD program runs
(dsv3_jax/parallel/pipeline/schedules.py, executed by parallel/pipeline/executor.py), beside the closed forms.

    python benchmarks/pipeline_schedules.py [--stages 2,4,16] [--microbatches 4,8,32] [--chunks 2]
                                            [--b_cost 2] [--output_json FILE]

Per (S, M) and schedule: ticks, the counted bubble (each tick as long as its busiest stage; F costs 1, B
`--b_cost`, a chunk's op 1/v of that), the formula, and the stage inputs each stage holds at its peak (in
activations of one micro-batch, [b, T, D]). The test suite checks count = formula (tests/test_pipeline_schedules.py);
this prints the table the README quotes.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3_jax.parallel.pipeline import schedules  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="2,4,16")
    p.add_argument("--microbatches", default="4,8,32")
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--b_cost", type=float, default=2.0)
    p.add_argument("--output_json", default=None)
    a = p.parse_args()
    rows = []
    print(f"{'S':>3} {'M':>3} {'schedule':<14} {'ticks':>5} {'bubble':>8} {'formula':>8}  held stage inputs per stage")
    for S, M in zip((int(x) for x in a.stages.split(",")), (int(x) for x in a.microbatches.split(","))):
        for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", a.chunks)):
            t = schedules.table(name, S, M, v, {"F": 1.0, "B": a.b_cost})
            f = schedules.bubble_formula(name, S, M, v)
            label = name + (f" v={v}" if v > 1 else "")
            held = [int(x) for x in t.peak_live]
            print(f"{S:>3} {M:>3} {label:<14} {t.ticks:>5} {t.bubble:>8.1%} {f:>8.1%}  {held}")
            rows.append({"stages": S, "microbatches": M, "schedule": name, "chunks": v, "ticks": t.ticks,
                         "bubble": t.bubble, "bubble_formula": f, "held_stage_inputs": held})
    if a.output_json:
        with open(a.output_json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
