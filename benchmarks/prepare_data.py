"""Preparation at scale: peak memory and throughput of `python -m dsv3_jax.data.prepare` as the corpus grows,
and the loader's start-up time on the result.

    python benchmarks/prepare_data.py [--sizes_mb 100,1000] [--workers 2] [--vocab 4096] [--json]

For each size a JSONL corpus of that many MB is generated from the embedded corpus (Python's help texts,
every copy with its words shuffled within lines so the text is not one repeated block), prepared by the
real CLI in a subprocess, and measured: wall time, tokens/s, and the peak resident memory of the whole
process tree (the main process plus its tokenising workers, sampled every 50 ms from /proc). Then the
training loader is built on the prepared directory (`data.build.build_data`: manifest, memory
maps, grain source) and its start-up time is reported, with the first batch read.
"""
from __future__ import annotations

import _common  # noqa: F401 (puts the repository on sys.path)

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from dsv3_jax.data import bpe, build
from dsv3_jax.data.corpus import default_corpus
from dsv3_jax.io import tokenizer as tokenizer_io


def make_corpus(path: str, megabytes: int, seed: int = 0) -> int:
    """Write ~megabytes MB of JSONL; returns the number of documents."""
    docs = [d for d in default_corpus() if d.strip()]
    rng = random.Random(seed)
    target, written, n = megabytes * 1_000_000, 0, 0
    with open(path, "w") as f:
        while written < target:
            d = docs[n % len(docs)]
            lines = []
            for line in d.split("\n"):
                words = line.split(" ")
                rng.shuffle(words)
                lines.append(" ".join(words))
            rec = json.dumps({"text": "\n".join(lines)}) + "\n"
            f.write(rec)
            written += len(rec)
            n += 1
    return n


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
        stack += children.get(p, [])
    return total


def run_prepare(corpus: str, tokenizer: str, out: str, workers: int) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "dsv3_jax.data.prepare", "--input", corpus, "--tokenizer", tokenizer,
           "--output", out, "--workers", str(workers), "--no_progress", "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"prepare failed:\n{err}")
    return time.perf_counter() - t0, peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes_mb", default="100,1000")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=1024, help="window length for the loader start-up measurement")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="prepare_bench_")
    try:
        tok_path = os.path.join(tmp, "tokenizer.json")
        tokenizer_io.save_tokenizer(bpe.train_tokenizer(default_corpus(), a.vocab), tok_path)
        rows = []
        print(f"{'corpus MB':>9} {'documents':>10} {'tokens':>13} {'seconds':>8} {'tokens/s':>10} "
              f"{'peak RSS MB':>11} {'loader start-up ms':>18}")
        for mb in (int(s) for s in a.sizes_mb.split(",")):
            corpus = os.path.join(tmp, f"corpus_{mb}.jsonl")
            docs = make_corpus(corpus, mb)
            out = os.path.join(tmp, f"prepared_{mb}")
            seconds, peak = run_prepare(corpus, tok_path, out, a.workers)
            os.remove(corpus)
            manifest = json.load(open(os.path.join(out, "manifest.json")))
            t0 = time.perf_counter()
            data = build.build_data(out, None, out, a.vocab, a.seq, seed=0, max_val_tokens=8 * (a.seq + 1))
            first = data.train.next_batch(8)
            first.rows(slice(None))
            startup = (time.perf_counter() - t0) * 1e3
            row = {"corpus_mb": mb, "documents": docs, "tokens": manifest["tokens"], "seconds": round(seconds, 1),
                   "tokens_per_sec": round(manifest["tokens"] / seconds), "peak_rss_mb": round(peak / 2**20),
                   "loader_startup_ms": round(startup, 1), "workers": a.workers}
            rows.append(row)
            print(f"{mb:>9} {docs:>10,} {row['tokens']:>13,} {seconds:>8.1f} {row['tokens_per_sec']:>10,} "
                  f"{row['peak_rss_mb']:>11,} {startup:>18.1f}")
            shutil.rmtree(out)
        if a.json:
            print(json.dumps(rows))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
