"""Merge the parts of benchmarks/gpu_suite.sh into OUT/suite.json and OUT/suite.md: each figure of issue #19
beside its target.

    python benchmarks/gpu_suite_report.py OUT

Reads OUT/train.json (train_throughput.py), OUT/grouped_gemm.json, OUT/fp8_gemm.json and OUT/fp8_loss_gap.json;
a missing or unreadable part is reported as missing (its figures 'n/a'), never invented. (Exit status 0:
gpu_suite.sh reports the parts that failed.)

    MFU                 the dsv3_jax BF16 step's model FLOP/s over the measured matmul peak (target >= 30%)
    grouped / dense     the lowest ratio over projections and loads, forward and fwd+bwd (target >= 60%)
    FP8 GEMM            the kernel over XLA's BF16 dot per V3 shape: lowest and geometric mean (target >= 1.3x)
    FP8 step            the BF16 step's ms over the FP8 step's (target > 1)
    FP8 loss gap        (fp8 - bf16) / bf16 of the final training loss after the loss-gap run's steps
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys


def _load(out: str, name: str):
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def summarize(parts: dict) -> dict:
    """The suite's figures from its parts (None where a part is missing)."""
    s = {"mfu": None, "train_tokens_per_sec": None, "vs_transformers": None, "fp8_step_speedup": None,
         "grouped_fwd": None, "grouped_fwd_bwd": None, "grouped_impl": None, "fp8_gemm_min": None,
         "fp8_gemm_geomean": None,
         "fp8_loss_gap": None, "fp8_loss_gap_steps": None}
    train = parts.get("train")
    if train:
        rows = {r["name"]: r for r in train["rows"]}
        bf16 = next((r for n, r in rows.items() if n.startswith("dsv3_jax (")), None)
        fp8 = next((r for n, r in rows.items() if n.startswith("dsv3_jax FP8")), None)
        if bf16:
            s.update(mfu=bf16["mfu"], train_tokens_per_sec=bf16["tokens_per_sec"],
                     vs_transformers=bf16["vs_transformers"])
        if bf16 and fp8:
            s["fp8_step_speedup"] = bf16["ms_per_step"] / fp8["ms_per_step"]
    grouped = parts.get("grouped_gemm")
    if grouped and grouped.get("min_ratio"):  # (of the better implementation: 'ragged' or 'mgpu')
        s["grouped_fwd"], s["grouped_fwd_bwd"] = grouped["min_ratio"]["fwd"], grouped["min_ratio"]["fwd+bwd"]
        s["grouped_impl"] = grouped.get("best_impl")
    gemm = parts.get("fp8_gemm")
    if gemm and gemm.get("rows"):
        ratios = [r["speedup_vs_bf16"] for r in gemm["rows"]]
        s["fp8_gemm_min"] = min(ratios)
        s["fp8_gemm_geomean"] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    gap = parts.get("fp8_loss_gap")
    if gap:
        s["fp8_loss_gap"] = gap["runs"][0]["final_loss"]["rel_gap"]
        s["fp8_loss_gap_steps"] = gap["steps"]
    return s


TARGETS = [  # (figure, label, format, target test or None)
    ("mfu", "train step MFU (BF16, of the measured matmul peak)", "{:.1%}", lambda v: v >= 0.30, ">= 30%"),
    ("train_tokens_per_sec", "train step tokens/s (BF16)", "{:,.0f}", None, ""),
    ("vs_transformers", "dsv3_jax over transformers (tokens/s)", "{:.2f}x", None, ""),
    ("grouped_fwd", "grouped GEMM / dense, forward (lowest)", "{:.1%}", lambda v: v >= 0.60, ">= 60%"),
    ("grouped_fwd_bwd", "grouped GEMM / dense, fwd+bwd (lowest)", "{:.1%}", lambda v: v >= 0.60, ">= 60%"),
    ("fp8_gemm_min", "FP8 GEMM / BF16 dot, lowest V3 shape", "{:.2f}x", lambda v: v >= 1.3, ">= 1.3x"),
    ("fp8_gemm_geomean", "FP8 GEMM / BF16 dot, geometric mean", "{:.2f}x", lambda v: v >= 1.3, ">= 1.3x"),
    ("fp8_step_speedup", "FP8 train step / BF16 step (speed)", "{:.2f}x", lambda v: v > 1.0, "> 1x"),
    ("fp8_loss_gap", "FP8 loss gap (final train loss, relative)", "{:+.3%}", None, "reported"),
]


def table(s: dict) -> str:
    lines = ["| figure | measured | target | met |", "|---|---|---|---|"]
    for key, label, fmt, test, target in TARGETS:
        v = s.get(key)
        shown = "n/a" if v is None else fmt.format(v)
        met = "-" if test is None or v is None else ("yes" if test(v) else "no")
        if key == "fp8_loss_gap" and s.get("fp8_loss_gap_steps"):
            label += f" after {s['fp8_loss_gap_steps']} steps"
        lines.append(f"| {label} | {shown} | {target or '-'} | {met} |")
    return "\n".join(lines)


def main(out: str) -> int:
    names = ("train", "grouped_gemm", "fp8_gemm", "fp8_loss_gap")
    parts = {n: _load(out, n) for n in names}
    seconds = {}
    for n in names:
        try:
            with open(os.path.join(out, f"{n}.seconds")) as f:
                seconds[n] = int(f.read().strip())
        except (OSError, ValueError):
            pass
    train = parts["train"] or {}
    s = summarize(parts)
    head = {"date": datetime.date.today().isoformat(), "device": train.get("device"), "backend": train.get("backend"),
            "versions": train.get("versions"), "config": train.get("config"), "batch": train.get("batch"),
            "seq": train.get("seq"), "seconds": seconds, "missing": [n for n in names if parts[n] is None]}
    with open(os.path.join(out, "suite.json"), "w") as f:
        json.dump(head | {"summary": s, "parts": parts}, f, indent=1)
    md = [f"dsv3_jax accelerator suite, {head['date']}, {head['device']} ({head['backend']}), {head['versions']}",
          f"config {head['config']}, batch {head['batch']} x {head['seq']} tokens; parts took "
          + ", ".join(f"{k} {v} s" for k, v in seconds.items()) + f" ({sum(seconds.values())} s)", "", table(s)]
    if head["missing"]:
        md += ["", "missing parts (failed or not run): " + ", ".join(head["missing"])]
    ops = train.get("top_ops") or []
    if ops:
        md += ["", "top ops of the BF16 train step by time:", "", "| op | ms | share |", "|---|---|---|"]
        md += [f"| {o['name'][:90]} | {o['ms']:.2f} | {o['share']:.1%} |" for o in ops]
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "suite.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu_suite_report.py OUT")
    sys.exit(main(sys.argv[1]))
