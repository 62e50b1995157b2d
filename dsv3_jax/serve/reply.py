"""The OpenAI bodies of one answer (`Reply`): the whole completion or chat message, or its server-sent-event
chunks, with usage, log-probabilities, reasoning_content and tool calls; `Choice` is one engine request behind
one choice of an answer."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

from dsv3_jax.serve.chat import TextStream
from dsv3_jax.serve.reasoning import ReasoningSplit
from dsv3_jax.serve.tools import ToolStream


def sse(obj) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj)}\n\n"


@dataclasses.dataclass
class Choice:
    """One engine request behind one choice of an answer."""

    index: int
    prompt_ids: list[int]
    prompt_text: str | None  # the prompt's text (echo)
    rid: int = -1
    events: asyncio.Queue | None = None
    req: object = None  # the finished Request
    stream: TextStream | None = None
    split: ReasoningSplit | None = None  # chat: the reasoning split, when the model thinks
    tools: ToolStream | None = None  # chat: the tool-call parser of a request with tools
    content_sent: str = ""  # chat, streamed, without tools: the content sent so far


class Reply:
    """The OpenAI bodies of one answer: the whole completion, or its server-sent-event chunks."""

    def __init__(self, routes, body, chat: bool):
        """`routes`: the app.Routes answering (its model name, token pieces, final text); `body`: the request."""
        self.routes, self.body, self.chat = routes, body, chat
        self.model = routes.model_name
        self.created, self.id = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.object = "chat.completion" if chat else "text_completion"
        self.echo = not chat and bool(body.echo)
        if chat:
            self.top = body.top_logprobs or 0 if body.logprobs else None
        else:
            self.top = body.logprobs

    def head(self, choices: list[dict], use=None, chunk: bool = False) -> dict:
        out = {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
               "created": self.created, "model": self.model, "choices": choices}
        if use is not None:
            out["usage"] = use
        return out

    def whole(self, choices: list[Choice]) -> dict:
        body = []
        for c in choices:
            req, text = c.req, self.routes.final_text(c.req)
            if self.chat:
                message = self.message(c, text)
                one = {"index": c.index, "message": message, "logprobs": self.logprobs(req.output, req.token_logprobs)}
                if message.get("tool_calls"):
                    one["finish_reason"] = "tool_calls"
                    body.append(one)
                    continue
            else:
                pre = c.prompt_text if self.echo else ""
                one = {"index": c.index, "text": pre + text, "logprobs": self.logprobs(req.output, req.token_logprobs,
                                                                                       c if self.echo else None)}
            one["finish_reason"] = req.finish_reason
            body.append(one)
        return self.head(body, usage(choices))

    def message(self, c: Choice, text: str) -> dict:
        """A chat answer's message: its reasoning split off (`reasoning_content`), its tool calls parsed
        (`tool_calls`, content null when there is none besides them)."""
        reasoning, content = c.split.whole(text) if c.split is not None else (None, text)
        calls = []
        if c.tools is not None:
            content, calls = c.tools.parser.whole(content)
            calls = calls if self.body.parallel_tool_calls is not False else calls[:1]
        out = {"role": "assistant", "content": content if content or not calls else None}
        if c.split is not None:
            out["reasoning_content"] = reasoning or None
        if calls:
            out["tool_calls"] = [call.openai("call_" + uuid.uuid4().hex[:24]) for call in calls]
        return out

    def deltas(self, c: Choice, text: str, final: bool) -> list[dict]:
        """A streamed chat choice's new deltas given its whole text so far: reasoning_content, content, and
        tool calls (the name first, then argument fragments)."""
        if c.split is not None:
            reasoning, _ = c.split.push(text, final)
            content = c.split.whole(text, final)[1]
        else:
            reasoning, content = "", text
        out = [{"reasoning_content": reasoning}] if reasoning else []
        if c.tools is None:
            new = content[len(c.content_sent):] if content.startswith(c.content_sent) else ""
            c.content_sent += new
            return out + ([{"content": new}] if new else [])
        for d in c.tools.push(content, final):
            if "content" in d:
                out.append({"content": d["content"]})
            elif d["index"] == 0 or self.body.parallel_tool_calls is not False:
                call = {"index": d["index"], "function": {"arguments": d["arguments"]}}
                if "name" in d:
                    call |= {"id": d["id"], "type": "function"}
                    call["function"]["name"] = d["name"]
                out.append({"tool_calls": [call]})
        return out

    def delta_chunk(self, c: Choice, delta: dict, finish=None, use=None, logprobs=None) -> str:
        return sse(self.head([{"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], use,
                             chunk=True))

    def logprobs(self, ids: list[int], lps: list, echo_of: Choice | None = None, offset: int = 0):
        """OpenAI's logprobs object for tokens `ids` (their (logprob, top) entries `lps`), None when not asked.
        Completions: tokens, token_logprobs, top_logprobs (a dict per token, the token itself included, as
        vLLM does) and text_offset, prompt tokens first with `echo_of` (the first prompt token: null). Chat:
        content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
        if self.top is None:
            return None
        piece = self.routes.piece
        if self.chat:
            def entry(t, lp):
                return {"token": piece(t), "logprob": lp, "bytes": list(piece(t).encode())}
            return {"content": [entry(t, lp) | {"top_logprobs": [entry(i, v) for i, v in top[:self.top]]}
                                for t, (lp, top) in zip(ids, lps)]}
        pairs = list(zip(echo_of.prompt_ids, echo_of.req.prompt_lps)) if echo_of is not None else []
        pairs += list(zip(ids, lps))
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, e in pairs:
            out["tokens"].append(piece(t))
            out["text_offset"].append(offset)
            offset += len(piece(t))
            if e is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                lp, top = e
                out["token_logprobs"].append(lp)
                out["top_logprobs"].append({piece(i): v for i, v in top} | {piece(t): lp})
        return out

    def chunk(self, c: Choice, text: str, finish=None, use=None, logprobs=None) -> str:
        if self.chat:
            choice = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                      "finish_reason": finish}
        else:
            choice = {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse(self.head([choice], use, chunk=True))

    def role_chunk(self, c: Choice) -> str:
        return sse(self.head([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}], chunk=True))


def usage(choices: list[Choice]) -> dict:
    """Prompt tokens once per prompt (the n choices of a prompt share it), completion tokens of every choice."""
    prompts = {id(c.prompt_ids): len(c.prompt_ids) for c in choices}
    done = [c.req for c in choices if c.req is not None]
    completion = sum(len(r.output) for r in done)
    return {"prompt_tokens": sum(prompts.values()), "completion_tokens": completion,
            "total_tokens": sum(prompts.values()) + completion}
