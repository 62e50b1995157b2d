"""Tokenizer training + encoding on pathological corpora: peak memory and time stay bounded.

    python benchmarks/pathological_corpus.py [--mb 50] [--vocab 4096] [--json FILE]

Writes three corpora of --mb megabytes each into a temporary directory and runs
`dsv3_jax.data.build.build_data` on each in a fresh process (train a byte-level BPE of --vocab tokens,
encode everything, split, cut windows), reporting the child's peak RSS (ru_maxrss) and wall time:

* one_line      English-like words with spaces but no newline: a single 50 MB line;
* no_space      one run of random letters without any whitespace (one 50 MB "word");
* base64        a base64 blob of random bytes in 76-character lines.

Before the fix (whole documents into BPE training and one encode_batch over the corpus) encoding cost
~100 MB of RAM per MB of text and the 50 MB line passed 8 GB. Now BPE learns from at most
`data.bpe.TOKENIZER_TRAIN_CHARS` characters with long runs cut, and encoding goes in bounded batches of
pieces that tokenise exactly like the whole document.
"""
import argparse
import base64
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time, tempfile
from dsv3_jax.data import build as data
t0 = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    d = data.build_data(sys.argv[1], None, tmp, int(sys.argv[2]), 128, 0.05, 0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": peak,
                  "tokens": d.n_train_tokens + d.n_val_tokens, "vocab": d.tokenizer.get_vocab_size()}))
"""


def write_corpora(directory: str, mb: int) -> dict:
    n = mb * 10**6
    rng = random.Random(0)
    words = ["the", "model", "routes", "each", "token", "to", "experts", "latent", "cache", "attention",
             "balance", "bias", "update", "sigmoid", "score", "group", "prediction", "depth", "multi"]
    paths = {}
    p = os.path.join(directory, "one_line.txt")
    with open(p, "w") as f:
        written = 0
        while written < n:
            chunk = " ".join(rng.choice(words) for _ in range(10000)) + " "
            f.write(chunk)
            written += len(chunk)
    paths["one_line"] = p
    p = os.path.join(directory, "no_space.txt")
    with open(p, "w") as f:
        for _ in range(0, n, 10**6):
            f.write("".join(rng.choices(string.ascii_letters, k=10**6)))
    paths["no_space"] = p
    p = os.path.join(directory, "base64.txt")
    with open(p, "wb") as f:
        f.write(base64.encodebytes(rng.randbytes(n * 3 // 4)))
    paths["base64"] = p
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_corpora(tmp, a.mb)
        print(f"| corpus ({a.mb} MB) | peak RSS MiB | seconds | tokens | MB/s |")
        print("|---|---|---|---|---|")
        for name, path in paths.items():
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, path, str(a.vocab)], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} | | | |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["wall_seconds"] = time.perf_counter() - t0
            results[name] = r
            print(f"| {name} | {r['peak_rss_mib']:.0f} | {r['seconds']:.1f} | {r['tokens']:,} | "
                  f"{os.path.getsize(path) / 1e6 / r['seconds']:.1f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"mb": a.mb, "vocab": a.vocab, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
