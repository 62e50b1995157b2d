"""Prepared token shards: `python -m dsv3_jax.data.prepare` against the in-memory encoder (same token ids, any
number of workers, long documents cut in pieces), bad records, interrupted and repeated preparations; the
grain loader (windows, shuffle, exact resume, only the asked rows read); training from a prepared
directory with an exact resume and `tokens_seen`."""
import gzip
import json
import os

import numpy as np
import pytest

from dsv3_jax import sharding
from dsv3_jax.cli import UserError
from dsv3_jax.data import bpe, shards
from dsv3_jax.data import prepare as P
from dsv3_jax.data.corpus import default_corpus
from dsv3_jax.data.loader import TokenLoader
from dsv3_jax.io import tokenizer as tokenizer_io

pytestmark = pytest.mark.xdist_group("prepare")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents in a .jsonl, a gzipped .jsonl and a .txt, and a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [t for t in default_corpus() if t.strip()][:78]
    assert len(docs) == 78
    (root / "in" / "sub").mkdir(parents=True)
    with open(root / "in" / "a.jsonl", "w") as f:
        for d in docs[:40]:
            f.write(json.dumps({"text": d}) + "\n")
    with gzip.open(root / "in" / "sub" / "b.jsonl.gz", "wt") as f:
        for d in docs[40:60]:
            f.write(json.dumps({"text": d}) + "\n")
    text = "\n".join(docs[60:])  # 18 documents as one text file
    (root / "in" / "c.txt").write_text(text)
    tok = bpe.train_tokenizer(docs, 600)
    tokenizer_io.save_tokenizer(tok, str(root / "tokenizer.json"))
    # file order of the inputs: a.jsonl, c.txt, sub/b.jsonl.gz
    return root, docs[:40] + [text] + docs[40:60], tok


def _stream(directory, split="train"):
    m = shards.read_manifest(str(directory))
    return shards.TokenStream(str(directory), m["splits"][split]["shards"])


@pytest.mark.parametrize("workers", [1, 2])
def test_prepared_tokens_equal_the_in_memory_encoder(corpus, tmp_path, workers):
    root, ordered, tok = corpus
    out = tmp_path / "out"
    m = P.prepare([str(root / "in")], str(root / "tokenizer.json"), str(out), val_fraction=0.0, workers=workers,
                  shard_tokens=5000, progress=False, log=lambda _: None)
    want = bpe.encode_corpus(tok, ordered)
    stream = _stream(out)
    np.testing.assert_array_equal(stream.read(0, len(stream)), want)
    assert m["tokens"] == len(want) and m["documents"] == len(ordered) and m["skipped"] == 0
    assert m["tokenizer_sha256"] == tokenizer_io.tokenizer_hash(tok) and m["vocab_size"] == tok.get_vocab_size()
    assert all(s["tokens"] == 5000 for s in m["splits"]["train"]["shards"][:-1])
    assert (out / "tokenizer.json").read_bytes() == (root / "tokenizer.json").read_bytes()
    assert m["inputs"] == ["a.jsonl", "c.txt", "sub/b.jsonl.gz"]


def test_long_documents_are_cut_without_changing_tokens(corpus, tmp_path, monkeypatch):
    """A text file far longer than a read block becomes several pieces; the ids equal the whole document's."""
    _, ordered, tok = corpus
    monkeypatch.setattr(P, "BLOCK_CHARS", 700)
    big = "\n".join(ordered[:30])
    (tmp_path / "big.txt").write_text(big)
    pieces = [r for r in P.records(str(tmp_path / "big.txt"), "big.txt")]
    assert len(pieces) > 10 and [p[2] for p in pieces].count(True) == 1
    P.prepare([str(tmp_path / "big.txt")], str(corpus[0] / "tokenizer.json"), str(tmp_path / "out"),
              val_fraction=0.0, progress=False, log=lambda _: None)
    stream = _stream(tmp_path / "out")
    np.testing.assert_array_equal(stream.read(0, len(stream)), bpe.encode_corpus(tok, [big]))


def test_val_split_is_whole_documents_by_name(corpus, tmp_path):
    root, ordered, tok = corpus
    m = P.prepare([str(root / "in")], str(root / "tokenizer.json"), str(tmp_path / "out"), val_fraction=0.2,
                  progress=False, log=lambda _: None)
    names = [f"a.jsonl:{i}" for i in range(1, 41)] + ["c.txt"] + [f"sub/b.jsonl.gz:{i}" for i in range(1, 21)]
    held = [P.in_val(n, 0.2) for n in names]
    assert 0 < sum(held) < len(names)
    for split, pick in (("train", False), ("val", True)):
        want = bpe.encode_corpus(tok, [d for d, h in zip(ordered, held) if h == pick])
        stream = _stream(tmp_path / "out", split)
        np.testing.assert_array_equal(stream.read(0, len(stream)), want)
        assert m["splits"][split]["documents"] == sum(h == pick for h in held)


def test_bad_records_fail_with_file_and_line_or_are_skipped(corpus, tmp_path):
    root = corpus[0]
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "x.jsonl").write_text('{"text": "good one"}\n{"text": oops}\n{"text": "good two"}\n')
    (bad / "y.txt").write_bytes(b"caf\xe9 au lait\n")
    tok = str(root / "tokenizer.json")
    with pytest.raises(UserError, match=r"x.jsonl:2: invalid JSON"):
        P.prepare([str(bad)], tok, str(tmp_path / "o1"), progress=False, log=lambda _: None)
    assert not shards.is_prepared(str(tmp_path / "o1"))  # a failed preparation leaves nothing readable
    logged = []
    m = P.prepare([str(bad)], tok, str(tmp_path / "o2"), on_error="skip", val_fraction=0.0, progress=False,
                  log=logged.append)
    assert m["skipped"] == 2 and m["documents"] == 2
    assert any("x.jsonl:2" in line for line in logged) and any("y.txt" in line and "UTF-8" in line for line in logged)


def test_interrupted_and_repeated_preparations(corpus, tmp_path):
    root = corpus[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-00000.bin").write_bytes(b"\0" * 12)  # what a killed preparation leaves: shards, no manifest
    assert not shards.is_prepared(str(out))
    args = ([str(root / "in" / "a.jsonl")], str(root / "tokenizer.json"), str(out))
    logged = []
    m = P.prepare(*args, val_fraction=0.0, progress=False, log=logged.append)
    assert "interrupted preparation" in logged[0] and shards.read_manifest(str(out)) == m
    with pytest.raises(UserError, match="already holds a prepared corpus"):
        P.prepare(*args, progress=False, log=lambda _: None)
    (out / "train-00000.bin").write_bytes(b"\0" * 8)  # a damaged shard is refused by size
    with pytest.raises(UserError, match="damaged"):
        shards.read_manifest(str(out))


def test_loader_windows_shuffle_resume_and_lazy_rows(corpus, tmp_path):
    root = corpus[0]
    P.prepare([str(root / "in")], str(root / "tokenizer.json"), str(tmp_path / "out"), val_fraction=0.0,
              shard_tokens=3000, progress=False, log=lambda _: None)
    stream = _stream(tmp_path / "out")
    T = 31
    loader = TokenLoader(stream, T, seed=5, order="shuffle")
    n = loader.n_windows
    assert n == len(stream) // (T + 1)
    first = np.asarray(loader.next_batch(n))  # one epoch: every window once, in a seeded order
    all_windows = stream.read(0, n * (T + 1)).reshape(n, T + 1)
    assert sorted(map(tuple, first)) == sorted(map(tuple, all_windows))
    assert not np.array_equal(first, all_windows)
    nxt = np.asarray(loader.next_batch(7))  # epoch 1 continues with another order
    assert not np.array_equal(nxt, first[:7])
    again = TokenLoader(stream, T, seed=5, order="shuffle")
    np.testing.assert_array_equal(np.asarray(again.next_batch(n)), first)
    resumed = TokenLoader(stream, T, seed=5, order="shuffle")
    resumed.restore(loader.state())
    older = TokenLoader(stream, T, seed=5, order="shuffle")  # a state saved before it named its order
    older.restore({k: v for k, v in loader.state().items() if k != "order"})
    a, b = np.asarray(loader.next_batch(9)), np.asarray(resumed.next_batch(9))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(older.next_batch(9)), a)
    with pytest.raises(UserError, match="windows"):
        TokenLoader(stream, T + 1, order="shuffle").restore(loader.state())

    # each device's rows are read once and only by the device that holds them
    reads = []

    class Counting:
        def __init__(self, ds):
            self.ds = ds

        def __getitem__(self, p):
            reads.append(p)
            return self.ds[p]

    batch = TokenLoader(stream, T, seed=5, order="shuffle").next_batch(16)
    batch.dataset = Counting(batch.dataset)
    mesh = sharding.make_mesh({"data": 8})
    x = sharding.put_global_batch(batch, sharding.batch_sharding(mesh))
    np.testing.assert_array_equal(np.asarray(x), first[:16])
    assert sorted(reads) == list(range(16))


def test_train_from_prepared_data_resumes_exactly(corpus, tmp_path):
    """train.py on a prepared directory: a run interrupted at step 5 and resumed logs the uninterrupted
    run's losses; tokens_seen counts every input token; a tokenizer_path of another tokenizer is refused."""
    from test_train import micro_config

    from dsv3_jax.train import loop

    root = corpus[0]
    prepared = tmp_path / "prepared"
    P.prepare([str(root / "in")], str(root / "tokenizer.json"), str(prepared), val_fraction=0.1,
              progress=False, log=lambda _: None)

    def config(**kw):
        c = micro_config(steps=8, **kw)
        c.data.path, c.model.vocab_size = str(prepared), 640
        c.train.log_every, c.train.eval_every, c.checkpoint.every_steps = 2, 4, 4
        return c

    full = loop.train(config(), str(tmp_path / "full"), quiet=True).history
    loop.train(config(), str(tmp_path / "split"), quiet=True, interrupt_at=5)
    resumed = loop.train(config(), str(tmp_path / "split"), quiet=True).history
    assert [r["step"] for r in full] == [2, 4, 6, 8]
    for a, b in zip(full[-2:], resumed):
        assert (a["step"], a["loss"], a.get("val_loss")) == (b["step"], b["loss"], b.get("val_loss"))
    assert [r["tokens_seen"] for r in full] == [2 * 8 * 32 * k for k in (1, 2, 3, 4)]
    assert resumed[-1]["tokens_seen"] == full[-1]["tokens_seen"]
    from dsv3_jax.infer.load import load_trained  # the workdir carries the prepared corpus's tokenizer

    _, tok, _, step = load_trained(str(tmp_path / "full"))
    assert step == 8 and tokenizer_io.tokenizer_hash(tok) == shards.read_manifest(str(prepared))["tokenizer_sha256"]
    other = bpe.train_tokenizer(["something else entirely"] * 50, 300)
    tokenizer_io.save_tokenizer(other, str(tmp_path / "other.json"))
    c = config()
    c.data.tokenizer_path = str(tmp_path / "other.json")
    with pytest.raises(UserError, match="not the tokenizer"):
        loop.train(c, str(tmp_path / "bad"), quiet=True)
    assert os.path.isfile(prepared / "manifest.json")


@pytest.mark.parametrize("args, needle", [
    (["--input", "/nonexistent/corpus", "--tokenizer", "TOK", "--output", "OUT"], "no such file or directory"),
    (["--input", "IN", "--tokenizer", "/nonexistent/tokenizer.json", "--output", "OUT"], "does not exist"),
    (["--input", "IN", "--tokenizer", "TOK", "--output", "OUT", "--val_fraction", "1.5"], "--val_fraction=1.5"),
])
def test_prepare_cli_bad_input_is_one_line(corpus, tmp_path, args, needle):
    import subprocess
    import sys

    root = corpus[0]
    subs = {"IN": str(root / "in"), "TOK": str(root / "tokenizer.json"), "OUT": str(tmp_path / "out")}
    r = subprocess.run([sys.executable, "-m", "dsv3_jax.data.prepare", *[subs.get(a, a) for a in args]],
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("python -m dsv3_jax.data.prepare: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert needle in lines[0], lines[0]
    assert not shards.is_prepared(subs["OUT"])


def test_peak_memory_does_not_grow_with_the_input(corpus, tmp_path, monkeypatch):
    """Python-side peak memory (tracemalloc: numpy buffers included) of preparing 0.5 MB and 4 MB of text with
    small waves and shards: eight times the input stays within 1.5x the peak (a whole-corpus read or
    token buffer would grow ~8x). The 100 MB / 1 GB process-tree figures: benchmarks/prepare_data.py."""
    import tracemalloc

    root = corpus[0]
    monkeypatch.setattr(P, "WAVE_CHARS_PER_WORKER", 1 << 15)
    monkeypatch.setattr(P, "BLOCK_CHARS", 1 << 14)
    docs = [t for t in default_corpus() if t.strip()]
    peaks = []
    for mb in (0.5, 4):
        src = tmp_path / f"in_{mb}.jsonl"
        with open(src, "w") as f:
            written, i = 0, 0
            while written < mb * 1e6:
                line = json.dumps({"text": docs[i % len(docs)]}) + "\n"
                f.write(line)
                written, i = written + len(line), i + 1
        tracemalloc.start()
        m = P.prepare([str(src)], str(root / "tokenizer.json"), str(tmp_path / f"out_{mb}"), val_fraction=0.01,
                      shard_tokens=1 << 15, progress=False, log=lambda _: None)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert m["tokens"] > mb * 1e5  # the corpus was really tokenised
    assert peaks[1] < 1.5 * peaks[0], peaks
