"""Chat prompts and streamed text, as the checkpoint's own files define them.

Chat template, the first of: `--chat_template FILE`; DIR/chat_template.jinja; DIR/tokenizer_config.json's
`chat_template` (a string, or a list of {name, template}: the one named 'default', else the first); for a
DeepSeek-V3.2 checkpoint without one (V3.2 ships a Python encoder instead), its encoder (dsml.py; also
`--chat_template deepseek_v32`). It is
rendered as transformers renders it, with `messages`, `add_generation_prompt=True` and the config's bos/eos
tokens, in jinja2's sandbox. Without one: the plain template used for the demo tokenizer, one line per message
and an open assistant turn:

    <role>: <content>\\n ... assistant:

A rendered chat prompt is tokenised without the tokenizer's own special tokens (`chat_ids`): the template writes
the BOS it wants, so no prompt starts with two. End-of-sequence ids (`eos_ids`): generation_config.json's
`eos_token_id` (an int or a list) and tokenizer_config.json's `eos_token`, else the demo tokenizer's EOS_ID.

Incremental detokenisation (`TextStream`): tokens are decoded together with everything before them and only
the new suffix is emitted; a suffix that ends in U+FFFD (a token that stops mid-character) is held back until
the character is complete, so no streamed chunk carries broken UTF-8.
"""
from __future__ import annotations

import json
import os

from dsv3_jax.cli import UserError
from dsv3_jax.data.bpe import EOS_ID

PLAIN_TEMPLATE = "{role}: {content}\n"
V32 = "deepseek_v32"  # DeepSeek-V3.2 ships a Python encoder, not a template: dsml.encode_v32 stands for one


def _json(directory: str | None, name: str) -> dict:
    path = None if directory is None else os.path.join(directory, name)
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); fix or remove it") from None
    if not isinstance(out, dict):
        raise UserError(f"{path} holds a {type(out).__name__}, not a JSON object; fix or remove it")
    return out


def _sandbox():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # transformers' settings (trim and lstrip blocks, loop controls), so a template renders here as it does there
    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])


def load_chat_template(directory: str | None, template_file: str | None = None) -> dict | None:
    """{'template', 'bos_token', 'eos_token'} from the checkpoint's files (see the module docstring), or None.
    A template that does not parse is refused here, at start-up, in one line."""
    import jinja2

    cfg = _json(directory, "tokenizer_config.json")
    jinja_file = None if directory is None else os.path.join(directory, "chat_template.jinja")
    v32 = "DeepseekV32ForCausalLM" in (_json(directory, "config.json").get("architectures") or ())
    if template_file == V32 or (template_file is None and v32 and not isinstance(cfg.get("chat_template"), (str, list))
                                and not (jinja_file and os.path.isfile(jinja_file))):
        return {"template": V32, "encoder": V32, "bos_token": "", "eos_token": ""}  # V3.2: its encoder (dsml.py)
    if template_file is not None:
        if not os.path.isfile(template_file):
            raise UserError(f"--chat_template {template_file}: no such file")
        source, tpl = template_file, open(template_file, encoding="utf-8").read()
    elif jinja_file is not None and os.path.isfile(jinja_file):
        source, tpl = jinja_file, open(jinja_file, encoding="utf-8").read()
    else:
        source, tpl = "tokenizer_config.json's chat_template", cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates (transformers' convention): 'default', else the first
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default", next(iter(named.values()), None))
    if not isinstance(tpl, str):
        return None
    try:
        _sandbox().parse(tpl)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template in {source} does not parse: {e} (line {e.lineno}); fix it or give "
                        f"another with --chat_template FILE") from None

    def token(v):
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    return {"template": tpl, "bos_token": token(cfg.get("bos_token")), "eos_token": token(cfg.get("eos_token"))}


def eos_ids(directory: str | None, tokenizer) -> tuple[int, ...]:
    """The ids that end a request: generation_config.json's eos_token_id (int or list), tokenizer_config.json's
    eos_token; EOS_ID (the demo tokenizer's) when neither names one."""
    ids = []
    gen = _json(directory, "generation_config.json").get("eos_token_id")
    for v in gen if isinstance(gen, list) else [gen]:
        if isinstance(v, int) and not isinstance(v, bool):
            ids.append(v)
    eos = _json(directory, "tokenizer_config.json").get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str) and tokenizer is not None and tokenizer.token_to_id(eos) is not None:
        ids.append(tokenizer.token_to_id(eos))
    return tuple(dict.fromkeys(ids)) or (EOS_ID,)


def chat_ids(tokenizer, text: str) -> list[int]:
    """A rendered chat prompt's ids: the template wrote every special token it wants (BOS included), so the
    tokenizer adds none of its own (as vLLM tokenises chat prompts)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def message_text(content) -> str | None:
    """A message's content as text: a string, None (an assistant turn with only tool calls: left None for the
    template), or OpenAI's content parts, of which only type 'text' is taken (joined by newlines, as vLLM does);
    other parts are refused."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise UserError(f"content parts of type {part.get('type')!r} are not supported: this model reads text "
                            f"parts only ({{'type': 'text', 'text': ...}})", field="messages")
        texts.append(part["text"])
    return "\n".join(texts)


def render_chat(messages: list[dict], template: dict | None, tools=None, generation_prompt: bool = True,
                **kwargs) -> str:
    """The chat template's text of `messages` (with the assistant's generation prompt after them unless
    `generation_prompt=False`: a whole conversation to train on, `data/chat.py`)."""
    if template is not None and template.get("encoder") == V32:
        from dsv3_jax.serve.dsml import encode_v32

        return encode_v32(messages, tools, thinking=bool(kwargs.get("thinking")))
    if template is None:
        return "".join(PLAIN_TEMPLATE.format(role=m["role"], content=m["content"] or "") for m in messages) + \
            ("assistant:" if generation_prompt else "")
    import jinja2

    # The template comes with the checkpoint: rendered in jinja2's sandbox (no attribute of Python's internals, no
    # mutation of the messages), as transformers renders chat templates, so a template cannot run code here.
    env = _sandbox()

    def raise_exception(message):  # what HF templates call on a conversation they do not accept
        raise UserError(f"the chat template refuses these messages: {message}", field="messages")

    try:
        reserved = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception"}
        kwargs = {k: v for k, v in kwargs.items() if k not in reserved}
        return env.from_string(template["template"]).render(**kwargs, messages=messages, tools=tools,
                                                           add_generation_prompt=generation_prompt,
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
