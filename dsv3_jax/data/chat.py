"""Conversations -> flagged token shards for chat fine-tuning (SFT):

    python -m dsv3_jax.data.prepare --chat --input FILE.jsonl [...] --tokenizer DIR_OR_FILE --output DIR
                                    [--chat_template FILE] [--targets assistant|last|all] [--max_tokens N]

Input: JSONL, one conversation per line, `{"messages": [{"role", "content"}, ...]}` in OpenAI's form (roles system,
user, assistant, tool; content a string or text parts; an assistant turn may carry `tool_calls`). Each conversation
is rendered with the checkpoint's chat template (DIR's, or --chat_template; the demo tokenizer has none and gets
the plain `role: content` lines) in the server's jinja2 sandbox (`serve/chat.py`: the same text the server would
prompt with), tokenised once, and followed by eos (unless the template ended it with eos, as DeepSeek's does).
Which tokens are targets (`--targets`):

    assistant   every assistant turn: the text a template adds after the prompt of that turn (the generation
                prompt `render(messages[:i], add_generation_prompt=True)`) up to the end of the turn, and the eos
                after a conversation that ends with one (the default, as in TRL's assistant-only loss)
    last        the last assistant turn only
    all         every token

A token is a target when the character it starts at lies in a target span (the tokenizer's offsets). The first
token starts a document: packed windows never attend across conversations (`data/packing.py`). A conversation
that cannot be used -- not JSON, no messages, an unknown role, a template that renders an earlier turn differently
once later turns follow (no prefix to cut at), no target token, longer than --max_tokens -- is a bad record: the run
fails naming FILE:LINE and why, or with --on_error skip each one is reported on stderr and counted in the manifest.
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from dsv3_jax.cli import UserError
from dsv3_jax.data import packing
from dsv3_jax.data.bpe import EOS_ID

ROLES = ("system", "user", "assistant", "tool")
TARGETS = ("assistant", "last", "all")


class BadConversation(ValueError):
    pass


def check_messages(rec) -> list[dict]:
    """The messages of one JSONL record, each {'role', 'content', ...}, or BadConversation saying what is wrong."""
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
        raise BadConversation('expected a JSON object with a "messages" list')
    msgs = rec["messages"]
    if not msgs:
        raise BadConversation("no messages")
    from dsv3_jax.serve.chat import message_text

    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise BadConversation(f"message {i}: role {role!r}; expected one of {', '.join(ROLES)}")
        try:
            text = message_text(m.get("content"))
        except (UserError, AttributeError, TypeError) as e:
            raise BadConversation(f"message {i}: {e}") from None
        if text is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise BadConversation(f"message {i} ({m['role']}): no content")
        out.append(dict(m, content=text))
    return out


def target_spans(messages: list[dict], render, mode: str) -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation's text, [start, end) character spans of its targets). `render(messages, gen)` is the
    chat template (`gen`: the assistant's generation prompt appended)."""
    full = render(messages, False)
    if mode == "all":
        return full, [(0, len(full))]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mode == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        prompt, upto = render(messages[:i], True), render(messages[:i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise BadConversation(f"the chat template renders the turns before message {i} differently once it "
                                  f"follows (no prefix to cut the assistant's text at); use --targets all or another "
                                  f"--chat_template")
        spans.append((len(prompt), len(upto)))
    if not any(e > s for s, e in spans):
        raise BadConversation("no assistant text to learn (no assistant turn, or empty ones); use --targets all to "
                              "train on every token")
    return full, spans


def encode_conversation(messages: list[dict], tokenizer, render, mode: str, max_tokens: int = 0) -> np.ndarray:
    """One conversation's flagged ids (uint32, `packing.encode`): its tokens then eos, targets per `mode`, the first
    token a document start."""
    if mode not in TARGETS:
        raise UserError(f"--targets {mode!r}: choose one of {', '.join(TARGETS)}")
    text, spans = target_spans(messages, render, mode)
    enc = tokenizer.encode(text, add_special_tokens=False)
    starts = np.asarray([o[0] for o in enc.offsets], np.int64)
    target = np.zeros(len(enc.ids), bool)
    for s, e in spans:
        target |= (starts >= s) & (starts < e)
    ids = list(enc.ids)
    if not ids or ids[-1] != EOS_ID:  # (a template that closes turns with eos, as DeepSeek's, has written it)
        ends_in_target = any(e >= len(text) for _, e in spans)  # the eos closes an assistant turn (or mode 'all')
        ids.append(EOS_ID)
        target = np.concatenate([target, [ends_in_target]])
    if max_tokens and len(ids) > max_tokens:
        raise BadConversation(f"{len(ids)} tokens, more than --max_tokens {max_tokens}")
    if not target.any():
        raise BadConversation("no target token after tokenising")
    first = np.zeros(len(ids), bool)
    first[0] = True
    return packing.encode(ids, target, first)


def conversations(path: str, opener) -> Iterator[tuple[int, object]]:
    """(line number, record or BadConversation) for every non-empty line of a JSONL file."""
    with opener(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, BadConversation(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, BadConversation(f"invalid JSON ({e.msg} at column {e.colno})")


def renderer(template_dir: str | None, template_file: str | None):
    """render(messages, gen) -> text with the chat template the server would use (`serve.chat`), and its name."""
    from dsv3_jax.serve.chat import load_chat_template, render_chat

    template = load_chat_template(template_dir, template_file)

    def render(messages, gen: bool) -> str:
        try:
            return render_chat(messages, template, generation_prompt=gen)
        except UserError as e:
            raise BadConversation(str(e)) from None

    name = "plain role lines" if template is None else (template_file or f"{template_dir}'s chat template")
    return render, name
