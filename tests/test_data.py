"""Tests for the data pipeline of small corpora (dsv3_jax/data/: corpus, bpe, loader, build).

Every test compares against values written by hand or computed along a second,
independent code path (e.g. per-document encoding vs batched encoding, a
straight `default_rng([seed, epoch]).permutation` vs the loader's bookkeeping),
so a bug in the pipeline makes it fail rather than merely run.
"""

import json
import os
import sys

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from dsv3_jax.data import bpe
from dsv3_jax.data.build import build_data, split_tokens
from dsv3_jax.data.corpus import STDLIB_FALLBACK_MAX_BYTES, default_corpus, load_corpus
from dsv3_jax.data.loader import TokenLoader, val_batches
from dsv3_jax.io import tokenizer as tokenizer_io

SMALL_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 10,
    "Naïve café, déjà vu — 東京 and Zürich. " * 10,
]

UNICODE_SAMPLES = [
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n",
    "Grüße aus Köln, ça va? ñandú",
    "日本語のテキスト、中文字符，한국어",
    "emoji 🎉🚀 with ZWJ 👩‍💻 and flags 🇩🇪",
    "combining e\u0301 vs é, RTL שלום مرحبا",
    "control \x00\x07 chars and \ufeff BOM",
    "",
]


@pytest.fixture(scope="module")
def small_tok():
    return bpe.train_tokenizer(SMALL_TEXTS, 300)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tokenizer_round_trips_any_text(small_tok, text):
    ids = small_tok.encode(text).ids
    assert small_tok.decode(ids) == text
    # Byte-level: a string the tokenizer never saw still needs at most one token per byte.
    assert len(ids) <= len(text.encode("utf-8"))


def test_special_token_ids_and_byte_alphabet(small_tok):
    assert small_tok.token_to_id("<|begin_of_text|>") == 0 == bpe.BOS_ID
    assert small_tok.token_to_id("<|end_of_text|>") == 1 == bpe.EOS_ID
    assert small_tok.id_to_token(0) == "<|begin_of_text|>"
    assert small_tok.id_to_token(1) == "<|end_of_text|>"
    # Ids 2..257 are exactly the 256 byte symbols; merges come after.
    byte_symbols = {small_tok.id_to_token(i) for i in range(2, 258)}
    assert byte_symbols == set(pre_tokenizers.ByteLevel.alphabet())
    assert 258 < small_tok.get_vocab_size() <= 300


def test_tokenizer_is_deterministic_and_compresses(small_tok):
    again = bpe.train_tokenizer(SMALL_TEXTS, 300)
    assert again.to_str() == small_tok.to_str()
    text = SMALL_TEXTS[0]
    assert len(small_tok.encode(text).ids) < len(text.encode("utf-8")) / 2


def test_train_tokenizer_rejects_vocab_below_byte_alphabet():
    with pytest.raises(ValueError, match="258"):
        bpe.train_tokenizer(SMALL_TEXTS, 200)


def test_load_tokenizer_missing_file(tmp_path):
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="nope"):
        tokenizer_io.load_tokenizer(missing)


def test_get_tokenizer_trains_saves_then_reuses(tmp_path):
    workdir = str(tmp_path / "run")
    first = bpe.get_tokenizer(None, workdir, SMALL_TEXTS, 300)
    saved = os.path.join(workdir, "tokenizer.json")
    assert os.path.isfile(saved)
    # A resumed run must reuse the saved file even if given different texts.
    resumed = bpe.get_tokenizer(None, workdir, ["completely different text zzz"] * 5, 300)
    assert resumed.to_str() == first.to_str()
    # An explicit path wins over the workdir.
    other = bpe.train_tokenizer(["other corpus " * 50], 280)
    other_path = str(tmp_path / "other.json")
    other.save(other_path)
    explicit = bpe.get_tokenizer(other_path, workdir, SMALL_TEXTS, 300)
    assert explicit.to_str() == other.to_str()


def test_get_tokenizer_vocab_larger_than_model_raises(tmp_path, small_tok):
    path = str(tmp_path / "tok.json")
    small_tok.save(path)
    n = small_tok.get_vocab_size()
    with pytest.raises(ValueError, match=rf"vocab_size to at least {n}"):
        bpe.get_tokenizer(path, str(tmp_path / "run"), SMALL_TEXTS, n - 1)
    assert bpe.get_tokenizer(path, str(tmp_path / "run"), SMALL_TEXTS, n).get_vocab_size() == n


# ---------------------------------------------------------------------------
# Corpus loading
# ---------------------------------------------------------------------------


def test_load_txt_md_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first line\nsecond line\n", encoding="utf-8")
    assert load_corpus(str(txt)) == ["first line\nsecond line\n"]
    md = tmp_path / "b.md"
    md.write_text("# Title\n\nbody ü", encoding="utf-8")
    assert load_corpus(str(md)) == ["# Title\n\nbody ü"]
    jl = tmp_path / "c.jsonl"
    jl.write_text(
        json.dumps({"text": "doc one", "id": 1}) + "\n\n"
        + json.dumps({"text": "doc\ntwo ✓"}) + "\n",
        encoding="utf-8",
    )
    assert load_corpus(str(jl)) == ["doc one", "doc\ntwo ✓"]


def test_load_directory_recursive_sorted(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "z.txt").write_text("Z", encoding="utf-8")
    (tmp_path / "a.md").write_text("A", encoding="utf-8")
    (tmp_path / "sub" / "m.jsonl").write_text('{"text": "M1"}\n{"text": "M2"}\n', encoding="utf-8")
    (tmp_path / "sub" / "deeper" / "d.txt").write_text("D", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    # Sorted by relative path: a.md, empty.txt (dropped), sub/deeper/d.txt, sub/m.jsonl, z.txt
    assert load_corpus(str(tmp_path)) == ["A", "D", "M1", "M2", "Z"]


def test_missing_path_error_names_path_and_option(tmp_path):
    missing = str(tmp_path / "no_such_corpus")
    with pytest.raises(FileNotFoundError) as e:
        load_corpus(missing)
    assert missing in str(e.value)
    assert "--config.data.path" in str(e.value)


def test_bad_jsonl_errors_name_file_line_and_field(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_corpus(str(jl))
    assert f"{jl}:2" in str(e.value) and '"text"' in str(e.value)

    jl.write_text('{"text": "ok"}\n{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        load_corpus(str(jl))

    jl.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: the \"text\" field must be a string"):
        load_corpus(str(jl))


def test_empty_or_unsupported_corpus_raises(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(empty))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("1,2", encoding="utf-8")
    with pytest.raises(ValueError, match="no .txt"):
        load_corpus(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="unsupported"):
        load_corpus(str(tmp_path / "d" / "x.csv"))


def test_default_corpus_is_pydoc_topics_sorted():
    from pydoc_data.topics import topics

    docs = default_corpus()
    assert docs == [topics[k] for k in sorted(topics)]
    assert sum(len(d) for d in docs) > 300_000
    assert load_corpus(None) == docs and load_corpus("") == docs


def test_default_corpus_falls_back_to_stdlib_sources(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)  # makes the import fail
    docs = default_corpus()
    stdlib = os.path.dirname(os.__file__)
    first = sorted(n for n in os.listdir(stdlib) if n.endswith(".py"))[0]
    with open(os.path.join(stdlib, first), encoding="utf-8", errors="replace") as f:
        assert docs[0] == f.read()
    sizes = [len(d.encode("utf-8")) for d in docs]
    # Capped: stops at the first file that reaches ~2 MB, so without the last it is below.
    assert sum(sizes[:-1]) < STDLIB_FALLBACK_MAX_BYTES
    assert len(docs) > 10


# ---------------------------------------------------------------------------
# Token stream and splits
# ---------------------------------------------------------------------------


def test_encode_corpus_matches_per_document_encoding(small_tok):
    docs = ["alpha beta", "γάμμα δέλτα 🎉", "the quick brown fox"]
    tokens = bpe.encode_corpus(small_tok, docs)
    assert tokens.dtype == np.int32
    expected = []
    for d in docs:
        expected += small_tok.encode(d).ids + [1]
    np.testing.assert_array_equal(tokens, np.array(expected, np.int32))
    assert tokens[-1] == 1 and int((tokens == 1).sum()) == len(docs)


def test_encode_corpus_treats_special_strings_in_text_as_text(small_tok):
    doc = "before <|end_of_text|> after <|begin_of_text|>"
    tokens = bpe.encode_corpus(small_tok, [doc])
    assert list(tokens).count(1) == 1 and 0 not in tokens  # only our separator is eos
    assert small_tok.decode(tokens[:-1].tolist()) == doc
    assert small_tok.encode_special_tokens is False  # the flag is restored


def test_split_tokens_sizes():
    tokens = np.arange(1000, dtype=np.int32)
    train, val = split_tokens(tokens, 0.1, seq_len=15)
    np.testing.assert_array_equal(train, np.arange(900))
    np.testing.assert_array_equal(val, np.arange(900, 1000))
    # A tiny fraction is enlarged to one window (seq_len + 1 tokens).
    train, val = split_tokens(tokens, 0.01, seq_len=63)
    assert (len(train), len(val)) == (936, 64)
    np.testing.assert_array_equal(val, np.arange(936, 1000))
    # No validation split.
    train, val = split_tokens(tokens, 0.0, seq_len=63)
    assert (len(train), len(val)) == (1000, 0)


def test_split_tokens_too_small_says_needed_vs_present():
    with pytest.raises(ValueError, match=r"has 100 tokens but needs at least 128"):
        split_tokens(np.arange(100), 0.05, seq_len=63)
    # The number it asks for is really enough, and one fewer is not.
    train, val = split_tokens(np.arange(128), 0.05, seq_len=63)
    assert (len(train), len(val)) == (64, 64)
    with pytest.raises(ValueError, match="needs at least 200"):
        split_tokens(np.arange(199), 0.5, seq_len=99)
    assert [len(x) for x in split_tokens(np.arange(200), 0.5, seq_len=99)] == [100, 100]


# ---------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------

SEQ = 7  # windows of 8 tokens
N_WINDOWS = 13


def _stream():
    # tokens = arange, so window i is [8i, 8i+1, ..., 8i+7]; 5 trailing tokens unused.
    return np.arange(N_WINDOWS * (SEQ + 1) + 5, dtype=np.int32)


def _window_ids(batch):
    return (batch[:, 0] // (SEQ + 1)).tolist()


def test_targets_are_inputs_shifted_by_one():
    loader = TokenLoader(_stream(), SEQ, seed=3)
    batch = loader.next_batch(4)
    assert batch.shape == (4, SEQ + 1) and batch.dtype == np.int32
    inputs, targets = batch[:, :-1], batch[:, 1:]
    np.testing.assert_array_equal(targets, inputs + 1)  # arange stream: next token = +1
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
    assert all(w[0] % (SEQ + 1) == 0 for w in batch)  # aligned, non-overlapping windows


def test_each_epoch_visits_every_window_once_in_seeded_order():
    loader = TokenLoader(_stream(), SEQ, seed=5)
    seen = []
    for bs in [1, 4, 6, 2, 5, 3, 5]:  # 26 windows = exactly two epochs
        seen += _window_ids(loader.next_batch(bs))
    assert len(seen) == 2 * N_WINDOWS
    for epoch in range(2):
        chunk = seen[epoch * N_WINDOWS : (epoch + 1) * N_WINDOWS]
        assert sorted(chunk) == list(range(N_WINDOWS))
        assert chunk == np.random.default_rng([5, epoch]).permutation(N_WINDOWS).tolist()
    assert seen[:N_WINDOWS] != seen[N_WINDOWS:]  # a fresh order each epoch
    assert loader.epoch == 2  # epoch 2, index 0: position 2 * N_WINDOWS
    assert loader.state() == {"position": 2 * N_WINDOWS, "n_windows": N_WINDOWS, "seed": 5, "order": "permutation"}


def test_loader_determinism_and_seed_dependence():
    a = TokenLoader(_stream(), SEQ, seed=0)
    b = TokenLoader(_stream(), SEQ, seed=0)
    c = TokenLoader(_stream(), SEQ, seed=1)
    ba = [a.next_batch(5) for _ in range(6)]
    bb = [b.next_batch(5) for _ in range(6)]
    bc = [c.next_batch(5) for _ in range(6)]
    for x, y in zip(ba, bb):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(ba, bc))


def test_resume_equivalence_with_changing_batch_size_across_epochs():
    sizes = [2, 3, 5, 8, 8, 13, 4, 1, 9, 7, 6]  # crosses several epoch boundaries
    reference = TokenLoader(_stream(), SEQ, seed=11)
    uninterrupted = [reference.next_batch(bs) for bs in sizes]
    for k in range(len(sizes) + 1):
        original = TokenLoader(_stream(), SEQ, seed=11)
        for bs in sizes[:k]:
            original.next_batch(bs)
        state = json.loads(json.dumps(original.state()))  # must survive JSON
        assert set(state) == {"position", "n_windows", "seed", "order"}
        assert all(type(v) is int for key, v in state.items() if key != "order")
        fresh = TokenLoader(_stream(), SEQ, seed=11)
        fresh.restore(state)
        # an old checkpoint's {"epoch", "index"} (the loader's state before it was a position) resumes the same
        old = TokenLoader(_stream(), SEQ, seed=11)
        old.restore({"epoch": state["position"] // N_WINDOWS, "index": state["position"] % N_WINDOWS})
        for bs, expected in zip(sizes[k:], uninterrupted[k:]):
            np.testing.assert_array_equal(fresh.next_batch(bs), expected)
            np.testing.assert_array_equal(old.next_batch(bs), expected)


def test_batch_larger_than_epoch_wraps_seamlessly():
    loader = TokenLoader(_stream(), SEQ, seed=2)
    ids = _window_ids(loader.next_batch(30))
    order0 = np.random.default_rng([2, 0]).permutation(N_WINDOWS).tolist()
    order1 = np.random.default_rng([2, 1]).permutation(N_WINDOWS).tolist()
    order2 = np.random.default_rng([2, 2]).permutation(N_WINDOWS).tolist()
    assert ids == order0 + order1 + order2[:4]
    assert loader.epoch == 2 and loader.state()["position"] == 2 * N_WINDOWS + 4  # epoch 2, index 4


def test_restore_rejects_bad_state():
    loader = TokenLoader(_stream(), SEQ, seed=0)
    with pytest.raises(ValueError):
        loader.restore({"epoch": 0, "index": N_WINDOWS})
    with pytest.raises(ValueError):
        loader.restore({"position": -1})
    with pytest.raises(ValueError, match="windows"):  # another corpus or seq_len
        loader.restore({"position": 3, "n_windows": N_WINDOWS + 1})
    with pytest.raises(ValueError, match="prepared directory"):  # a state of the other order
        TokenLoader(_stream(), SEQ, seed=0, order="shuffle").restore(loader.state())
    with pytest.raises(ValueError):
        TokenLoader(np.arange(5), SEQ, seed=0)  # not even one window
    assert loader.state()["position"] == 0  # nothing was changed by the refused states


def test_val_batches_sequential_and_capped():
    tokens = _stream()  # 13 windows
    batches = val_batches(tokens, SEQ, batch_size=4, max_batches=None)
    assert len(batches) == 3  # only full batches
    assert [_window_ids(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    np.testing.assert_array_equal(batches[1][0], np.arange(32, 40))
    capped = val_batches(tokens, SEQ, batch_size=4, max_batches=2)
    assert len(capped) == 2 and all(np.array_equal(x, y) for x, y in zip(capped, batches))
    # Fewer windows than the batch size: one batch, cycling through the windows.
    few = val_batches(tokens[: 3 * (SEQ + 1)], SEQ, batch_size=5, max_batches=4)
    assert len(few) == 1 and _window_ids(few[0]) == [0, 1, 2, 0, 1]
    assert val_batches(tokens[:0], SEQ, batch_size=4, max_batches=4) == []
    # Deterministic: the same call gives the same list.
    again = val_batches(tokens, SEQ, batch_size=4, max_batches=None)
    assert all(np.array_equal(x, y) for x, y in zip(again, batches))


# ---------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------


def test_build_data_on_small_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in SMALL_TEXTS), encoding="utf-8")
    workdir = str(tmp_path / "run")
    d = build_data(str(corpus), None, workdir, vocab_size=300, seq_len=16, val_fraction=0.1, seed=0)
    assert os.path.isfile(os.path.join(workdir, "tokenizer.json"))
    tokens = bpe.encode_corpus(d.tokenizer, SMALL_TEXTS)
    assert d.n_train_tokens + d.n_val_tokens == len(tokens)
    assert d.n_val_tokens == int(np.ceil(0.1 * len(tokens)))
    np.testing.assert_array_equal(d.val, tokens[-d.n_val_tokens :])
    assert d.train.n_windows == d.n_train_tokens // 17
    # A second build in the same workdir (a resume) gives the same batches.
    d2 = build_data(str(corpus), None, workdir, vocab_size=300, seq_len=16, val_fraction=0.1, seed=0)
    np.testing.assert_array_equal(d.train.next_batch(3), d2.train.next_batch(3))


def test_build_data_default_corpus_4k_vocab(tmp_path):
    from pydoc_data.topics import topics

    d = build_data(None, None, str(tmp_path), vocab_size=4096, seq_len=256, val_fraction=0.05, seed=0)
    assert d.tokenizer.get_vocab_size() == 4096
    assert d.n_documents == len(topics)
    n = d.n_train_tokens + d.n_val_tokens
    assert d.n_val_tokens == int(np.ceil(0.05 * n))
    # ~465 KB of English text at a 4k vocab: roughly 3-6 bytes per token.
    n_bytes = sum(len(t.encode("utf-8")) for t in topics.values())
    assert n_bytes / 6 < n < n_bytes / 3


def _llama3_style_tokenizer(texts):
    """A byte-level BPE behind the Llama-3 / DeepSeek-V3 style regex (punctuation joins following newlines)."""
    from tokenizers import Regex, Tokenizer, models, trainers

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=list(bpe.SPECIAL_TOKENS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return tok


@pytest.mark.parametrize("kind", ["ours", "llama3_regex"])
def test_split_document_tokenises_like_the_whole(kind):
    """Cuts go where the tokenizer ends a word anyway (checked with it), so the pieces' tokens are the
    whole text's tokens: prose, grammar blocks full of spaces, control characters, punctuation + newline."""
    texts = default_corpus()[:40]
    tok = bpe.train_tokenizer(texts, 600) if kind == "ours" else _llama3_style_tokenizer(texts)
    big = "\n\n".join(texts) + "  trailing  spaces\t\tand tabs" + "ab!\x1cy" * 200 + "End.\n\nNext"
    pieces = bpe.split_document(big, 700, tokenizer=tok)
    assert "".join(pieces) == big and len(pieces) > 10 and max(map(len, pieces)) <= 700
    assert [i for p in pieces for i in tok.encode(p).ids] == tok.encode(big).ids
    np.testing.assert_array_equal(bpe.encode_corpus(tok, [big, "x"]),
                                  np.array(tok.encode(big).ids + [bpe.EOS_ID] + tok.encode("x").ids + [bpe.EOS_ID]))


def test_tokenizer_hash_is_the_mapping_not_the_json():
    """Same vocabulary and merges written in either JSON spelling of merges -> same hash; other merges differ."""
    tok = bpe.train_tokenizer(default_corpus()[:20], 400)
    d = json.loads(tok.to_str())
    merges = d["model"]["merges"]
    d["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]  # the pre-0.20 spelling
    from tokenizers import Tokenizer

    assert tokenizer_io.tokenizer_hash(Tokenizer.from_str(json.dumps(d))) == tokenizer_io.tokenizer_hash(tok)
    other = bpe.train_tokenizer(default_corpus()[20:40], 400)
    assert tokenizer_io.tokenizer_hash(other) != tokenizer_io.tokenizer_hash(tok)


def test_split_document_hard_cut_without_whitespace():
    run = "ab" * 1000
    pieces = bpe.split_document(run, 300)
    assert "".join(pieces) == run and all(len(p) == 300 for p in pieces[:-1])


def test_training_pieces_are_bounded():
    """BPE training reads at most max_chars characters, with non-whitespace runs cut to MAX_TRAIN_WORD."""
    long_word = "q" * 5000
    pieces = list(bpe.training_pieces(["hello world " + long_word + " end", "more text " * 100], max_chars=3000))
    assert sum(map(len, pieces)) == 3000
    assert "".join(pieces) == ("hello world " + long_word)[:3000]
    assert max(len(w) for p in pieces for w in p.split()) <= bpe.MAX_TRAIN_WORD
