"""Chat fine-tuning on a CPU, end to end: the demo model, LoRA on conversations, its answers before and after.

    python examples/chat/sft_demo.py [--workdir runs/chat_demo] [--base_steps 300] [--sft_steps 200] [--rank 16]

  1. base   the tiny demo model pretrained on the embedded corpus (`python train.py`; skipped when WORKDIR/base has
            a checkpoint)
  2. data   examples/chat/demo_chat.jsonl (480 conversations written for the repo, `make_demo_chat.py`) prepared
            with the base's tokenizer: `python -m dsv3_jax.data.prepare --chat`, 10% held out
  3. sft    LoRA (rank --rank on every MLA projection and the dense and shared-expert MLPs), the base frozen, from
            `--config.init_from=WORKDIR/base`; validation loss on the held-out conversations (assistant tokens
            only) every 25 steps
  4. the greedy answers of the base and of the fine-tuned model to held-out questions

Prints the validation curve, the answers before and after, and one JSON line; the README's worked example is
this output. The same steps as commands are in the README.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import ml_collections  # noqa: E402

from dsv3_jax.analysis import load_config  # noqa: E402
from dsv3_jax.data import prepare  # noqa: E402
from dsv3_jax.data.bpe import EOS_ID  # noqa: E402
from dsv3_jax.infer.engine import Engine  # noqa: E402
from dsv3_jax.infer.load import load_trained  # noqa: E402
from dsv3_jax.serve.chat import chat_ids, render_chat  # noqa: E402
from dsv3_jax.train.loop import train  # noqa: E402

QUESTIONS = ["What is 23 plus 19?", "Which is larger, 64 or 81?", "Spell the word garden backwards.",
             "How many letters are in the word planet?"]


def answers(workdir: str, tokens: int = 16) -> list[str]:
    model, tok, _, _ = load_trained(workdir)
    prompts = [chat_ids(tok, render_chat([{"role": "user", "content": q}], None)) for q in QUESTIONS]
    eng = Engine.for_batch(model, len(prompts), max(map(len, prompts)) + tokens)
    return [tok.decode(r.tokens).strip() for r in eng.generate(prompts, tokens, stop_tokens=(EOS_ID,))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "chat_demo"))
    p.add_argument("--base_steps", type=int, default=300)
    p.add_argument("--sft_steps", type=int, default=200)
    p.add_argument("--rank", type=int, default=16)
    a = p.parse_args()
    base, data, sft = (os.path.join(a.workdir, n) for n in ("base", "chat_data", "sft"))
    if not os.path.isdir(os.path.join(base, "checkpoints")):
        c = load_config("tiny")
        c.train.steps, c.train.sample_tokens = a.base_steps, 0
        train(c, base)
    prepare.prepare_chat([os.path.join(ROOT, "examples", "chat", "demo_chat.jsonl")], base, data, val_fraction=0.1,
                         overwrite=True)
    before = answers(base)
    c = load_config("tiny")
    c.init_from, c.data.path = base, data
    c.lora = ml_collections.ConfigDict({"rank": a.rank, "alpha": 2.0 * a.rank, "dropout": 0.0,
                                        "targets": "wq_a,wq_b,wkv_a,wkv_b,wo,dense_ffn,shared_experts"})
    t = c.train
    t.steps, t.warmup_steps, t.eval_every, t.log_every, t.eval_batches, t.sample_tokens = a.sft_steps, 10, 25, 25, 2, 0
    t.peak_lr = 3e-3
    c.checkpoint.every_steps = a.sft_steps
    out = train(c, sft)
    after = answers(sft)
    curve = [(r["step"], r["loss"], r.get("val_loss")) for r in out.history]
    print(f"\nLoRA rank {a.rank}: {out.history[-1]['trainable_params']:,} of {out.history[-1]['total_params']:,} "
          f"parameters trained")
    print(f"{'step':>6}{'train loss':>12}{'val loss':>10}")
    for step, loss, val in curve:
        print(f"{step:>6}{loss:>12.3f}{val:>10.3f}" if val is not None else f"{step:>6}{loss:>12.3f}")
    print(f"\n{'question':<44}{'base':<36}fine-tuned")
    for q, b, f in zip(QUESTIONS, before, after):
        print(f"{q:<44}{b[:34]!r:<36}{f!r}")
    print(json.dumps({"curve": curve, "questions": QUESTIONS, "before": before, "after": after,
                      "trainable_params": out.history[-1]["trainable_params"],
                      "total_params": out.history[-1]["total_params"]}))


if __name__ == "__main__":
    main()
