"""The generation check during fine-tuning (`config.train.eval_generate`): greedy answers to held-out prompts.

From the validation split of chat data (flagged windows, `data/packing.py`) the first `n` conversations give a
prompt (their tokens up to the first target, i.e. through the template's generation prompt) and a reference (that
first run of target tokens: the assistant's answer, and the eos closing it). At every evaluation the model of the
moment answers each prompt greedily through the engine (`infer/engine.py`), and the run logs

    eval_exact_match   the share of answers equal to their reference (as text, the eos left out)
    eval_generation    [{"prompt", "reference", "output"}] (metrics.jsonl; TensorBoard shows it as a text table)
"""
from __future__ import annotations

import numpy as np

from dsv3_jax.data import packing


def held_out_prompts(val_tokens, n: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of the first `n` conversations of a flagged validation stream that have both."""
    w = np.asarray(val_tokens).astype(np.int64)
    tokens = w & packing.TOKEN_MASK
    target = (w & packing.NOT_TARGET) == 0
    starts = list(np.flatnonzero(w & packing.DOC_START)) + [len(w)]
    out = []
    for s, e in zip(starts[:-1], starts[1:]):
        hits = np.flatnonzero(target[s:e])
        if not len(hits) or hits[0] == 0:
            continue
        i = s + int(hits[0])
        j = i
        while j < e and target[j]:
            j += 1
        out.append((tokens[s:i].tolist(), tokens[i:j].tolist()))
        if len(out) == n:
            break
    return out


def generation_check(model, tokenizer, pairs, eos_id: int) -> dict:
    """Greedy answers of `model` to the held-out prompts: {'eval_exact_match', 'eval_generation'}."""
    from dsv3_jax.infer.engine import Engine

    new = max(len(r) for _, r in pairs) + 2
    engine = Engine.for_batch(model, len(pairs), max(len(p) for p, _ in pairs) + new)
    outs = engine.generate([p for p, _ in pairs], new, stop_tokens=(eos_id,))
    samples = []
    for (prompt, ref), out in zip(pairs, outs):
        ref_text = tokenizer.decode([t for t in ref if t != eos_id]).strip()
        samples.append({"prompt": tokenizer.decode(prompt), "reference": ref_text,
                        "output": tokenizer.decode(out.tokens).strip()})
    exact = float(np.mean([s["output"] == s["reference"] for s in samples]))
    return {"eval_exact_match": exact, "eval_generation": samples}
