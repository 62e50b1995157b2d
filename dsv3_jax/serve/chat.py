"""Chat prompts and streamed text.

Chat template: a checkpoint's tokenizer_config.json `chat_template` (Jinja, as transformers renders it, with
`messages`, `add_generation_prompt=True` and the config's bos/eos tokens) when it has one; otherwise the plain
template used for the demo tokenizer, one line per message and an open assistant turn:

    <role>: <content>\\n ... assistant:

Incremental detokenisation (`TextStream`): tokens are decoded together with everything before them and only
the new suffix is emitted; a suffix that ends in U+FFFD (a token that stops mid-character) is held back until
the character is complete, so no streamed chunk carries broken UTF-8.
"""
from __future__ import annotations

import json
import os

from dsv3_jax.cli import UserError

PLAIN_TEMPLATE = "{role}: {content}\n"


def load_chat_template(directory: str | None) -> dict | None:
    """{'template', 'bos_token', 'eos_token'} from DIR/tokenizer_config.json, or None."""
    path = None if directory is None else os.path.join(directory, "tokenizer_config.json")
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    tpl = cfg.get("chat_template")
    if not isinstance(tpl, str):
        return None

    def token(v):
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    return {"template": tpl, "bos_token": token(cfg.get("bos_token")), "eos_token": token(cfg.get("eos_token"))}


def message_text(content) -> str:
    """A message's content as text: a string, None (an assistant turn with only tool calls), or OpenAI's content
    parts, of which only type 'text' is taken (joined by newlines, as vLLM does); other parts are refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise UserError(f"content parts of type {part.get('type')!r} are not supported: this model reads text "
                            f"parts only ({{'type': 'text', 'text': ...}})", field="messages")
        texts.append(part["text"])
    return "\n".join(texts)


def render_chat(messages: list[dict], template: dict | None) -> str:
    if template is None:
        return "".join(PLAIN_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages) + "assistant:"
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The template comes with the checkpoint: rendered in jinja2's sandbox (no attribute of Python's internals, no
    # mutation of the messages), as transformers renders chat templates, so a template cannot run code here.
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)

    def raise_exception(message):  # what HF templates call on a conversation they do not accept
        raise UserError(f"the chat template refuses these messages: {message}", field="messages")

    try:
        return env.from_string(template["template"]).render(messages=messages, add_generation_prompt=True,
                                                           bos_token=template["bos_token"],
                                                           eos_token=template["eos_token"],
                                                           raise_exception=raise_exception)
    except jinja2.TemplateError as e:  # (SecurityError included: a template that reaches outside the sandbox)
        raise UserError(f"the chat template cannot render these messages: {type(e).__name__}: {e}",
                        field="messages") from None


class TextStream:
    """Token ids in, complete text suffixes out. `holdback` characters stay unsent until the end (the longest
    stop string: text that may turn out to be the start of one is never streamed). Given the engine's text so
    far (`Request.text`, cut before a stop string it found), `push` streams from that text instead of decoding
    the ids itself: the token a stop string starts in is sent as ids, but its text past the cut never is."""

    def __init__(self, tokenizer, holdback: int = 0):
        self.tokenizer, self.ids, self.sent, self.holdback = tokenizer, [], "", holdback

    def push(self, new: list[int], text: str | None = None) -> str:
        self.ids.extend(new)
        text = self.tokenizer.decode(self.ids) if text is None else text
        if text.endswith("\ufffd"):
            return ""
        text = text[: max(len(self.sent), len(text) - self.holdback)]
        if not text.startswith(self.sent):
            return ""
        out, self.sent = text[len(self.sent):], text
        return out

    def flush(self, final_text: str | None = None) -> str:
        text = self.tokenizer.decode(self.ids) if final_text is None else final_text
        out = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return out
