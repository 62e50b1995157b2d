"""The OpenAI-compatible HTTP API over an `EngineWorker` (FastAPI; `python serve.py` runs it with uvicorn).

    POST /v1/completions        prompt (string or token ids), max_tokens, temperature, top_p, top_k, seed,
                                stop (string or list), n=1, stream, speculative (must match the server's mode)
    POST /v1/chat/completions   messages [{role, content}] through the chat template (chat.py), same fields
    GET  /v1/models             the one served model
    GET  /health                200 when the engine thread is alive, 503 otherwise
    GET  /metrics               Prometheus text: running / waiting requests, prompt and generated tokens,
                                cache pages used / free, prefix-cache hits, speculative drafts / accepted,
                                time-to-first-token and inter-token latency histograms

Every response carries `usage` (prompt, completion, total tokens). Streaming answers are server-sent events
in OpenAI's chunk format, one chunk per committed piece of text, then a final chunk with finish_reason and
usage, then `data: [DONE]`. Errors have OpenAI's body {"error": {"message", "type", "param", "code"}}:
a malformed body or a field out of range is 400 naming the field, an unknown model 404, a full queue 429
with Retry-After. A client that disconnects cancels its request (its pages return to the pool).
"""
from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dsv3_jax.cli import UserError
from dsv3_jax.infer.sampling import SamplingParams
from dsv3_jax.serve.chat import TextStream, render_chat
from dsv3_jax.serve.worker import EngineWorker, QueueFull


class Message(BaseModel):
    role: str
    content: str


class _Common(BaseModel):
    """The fields every request shares. Nullable as clients send them (`"temperature": null` means the default);
    `max_completion_tokens` is what current OpenAI SDKs send for `max_tokens`; `top_k` -1 (vLLM's "off") and any
    top_k at or past the vocabulary mean no top-k; any integer seed is accepted (reduced mod 2**31 for the
    engine's int32 keys), and a request without one gets a fresh random seed."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    speculative: bool | None = None


class CompletionRequest(_Common):
    prompt: str | list[int]


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", headers=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def build_app(worker: EngineWorker, tokenizer, model_name: str, *, chat_template=None,
              default_max_tokens: int = 16) -> FastAPI:
    """The FastAPI app of `Routes` over `worker` (its finished requests feed the metrics)."""
    app = FastAPI(title="dsv3_jax", docs_url=None, redoc_url=None)
    routes = Routes(worker, tokenizer, model_name, chat_template, default_max_tokens)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    return app


async def bad_request(request: Request, exc: RequestValidationError):
    """400 naming the first field pydantic refused (or saying the body is not JSON)."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        msg, param = f"the body is not valid JSON: {msg}", None
    return error(400, f"{param}: {msg}" if param else msg, param)


class Metrics:
    """The Prometheus registry: counters and histograms fed by finished requests, gauges read from the engine."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        self.prompt = Counter("dsv3_prompt_tokens", "Prompt tokens of finished requests", registry=reg)
        self.generated = Counter("dsv3_generated_tokens", "Generated tokens of finished requests", registry=reg)
        self.finished = Counter("dsv3_requests_finished", "Finished requests", ["finish_reason"], registry=reg)
        self.drafted = Counter("dsv3_spec_drafted", "MTP drafts verified", registry=reg)
        self.accepted = Counter("dsv3_spec_accepted", "MTP drafts accepted", registry=reg)
        self.ttft = Histogram("dsv3_time_to_first_token_seconds", "Time to first token", registry=reg,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("dsv3_inter_token_latency_seconds", "Mean gap between a request's tokens", registry=reg,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.gauges = {k: Gauge(f"dsv3_{k}", f"{k.replace('_', ' ')} (engine)", registry=reg)
                       for k in ("running", "waiting", "requests_held", "pages_used", "pages_free", "prefix_hits",
                                 "preemptions")}

    def on_finish(self, req):  # engine thread
        self.prompt.inc(len(req.prompt))
        self.generated.inc(len(req.output))
        self.finished.labels(req.finish_reason or "unknown").inc()
        self.drafted.inc(req.drafted)
        self.accepted.inc(req.accepted)
        if req.token_times and req.started is not None:
            self.ttft.observe(max(0.0, req.token_times[0] - req.arrival))
        if len(req.token_times) > 1:
            self.itl.observe((req.token_times[-1] - req.token_times[0]) / (len(req.token_times) - 1))

    def render(self, stats: dict) -> str:
        from prometheus_client import generate_latest

        for k, v in stats.items():
            if k in self.gauges:
                self.gauges[k].set(v)
        return generate_latest(self.registry).decode()


def usage(req) -> dict:
    return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.output),
            "total_tokens": len(req.prompt) + len(req.output)}


def sse(obj) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj)}\n\n"


def prompt_field(chat: bool) -> str:
    return "messages" if chat else "prompt"


def refused_field(e: UserError, chat: bool) -> str:
    """The request field a refused submit names: the error's `field` (the prompt is `messages` in a chat)."""
    return prompt_field(chat) if e.field in (None, "prompt") else e.field


class Reply:
    """The OpenAI bodies of one answer: the whole completion, or its server-sent-event chunks."""

    def __init__(self, model_name: str, chat: bool):
        self.model, self.chat = model_name, chat
        self.created, self.id = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.object = "chat.completion" if chat else "text_completion"

    def whole(self, text: str, req) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = req.finish_reason
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(req)}

    def role_chunk(self) -> str:
        choice = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
        return sse({"id": self.id, "object": self.object + ".chunk", "created": self.created,
                    "model": self.model, "choices": [choice]})

    def chunk(self, text: str, finish=None, use=None) -> str:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        out = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
               "model": self.model, "choices": [choice]}
        if use is not None:
            out["usage"] = use
        return sse(out)


class Routes:
    """The routes over one `EngineWorker`, each a short method; `build_app` registers them."""

    def __init__(self, worker: EngineWorker, tokenizer, model_name: str, chat_template, default_max_tokens: int):
        self.worker, self.engine, self.tokenizer = worker, worker.engine, tokenizer
        self.model_name, self.chat_template, self.default_max_tokens = model_name, chat_template, default_max_tokens
        self.stats = Metrics()
        worker.on_finish = self.stats.on_finish

    async def health(self):
        if self.worker.error is not None or not self.worker.thread.is_alive():
            return error(503, f"the engine thread stopped: {self.worker.error!r}", kind="server_error")
        return {"status": "ok"}

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "dsv3_jax",
                                            "created": 0}]}

    async def metrics(self):
        return PlainTextResponse(self.stats.render(self.worker.stats()), media_type="text/plain; version=0.0.4")

    async def completions(self, body: CompletionRequest):
        ids = body.prompt if isinstance(body.prompt, list) else self.tokenizer.encode(body.prompt).ids
        return await self.answer(body, ids, chat=False)

    async def chat_completions(self, body: ChatRequest):
        try:
            text = render_chat([m.model_dump() for m in body.messages], self.chat_template)
        except UserError as e:
            return error(400, str(e), "messages")
        return await self.answer(body, self.tokenizer.encode(text).ids, chat=True)

    def sampling(self, body: _Common) -> SamplingParams:
        """The request's sampling, every value in the engine's range (see `_Common`)."""
        top_k = body.top_k or 0
        if top_k < 0 or top_k >= self.engine.cfg.vocab_size:
            top_k = 0
        seed = secrets.randbits(31) if body.seed is None else body.seed % 2 ** 31
        return SamplingParams(1.0 if body.temperature is None else body.temperature, top_k,
                              1.0 if body.top_p is None else body.top_p, seed)

    def refusal(self, body: _Common, stops: list[str], prompt_ids: list[int], chat: bool) -> JSONResponse | None:
        """The error response for a request this server cannot take, checked before the engine sees it."""
        engine = self.engine
        if body.model != self.model_name:
            return error(404, f"model {body.model!r} does not exist; this server serves {self.model_name!r}", "model",
                         kind="not_found_error")
        if body.speculative is not None and body.speculative != engine.speculative:
            return error(400, f"speculative={body.speculative}: this server runs speculative={engine.speculative} "
                              f"(start it with --speculative to change that)", "speculative")
        if any(not s for s in stops):
            return error(400, "stop: stop strings must be non-empty", "stop")
        if len(prompt_ids) >= engine.max_seq_len:
            return error(400, f"the prompt has {len(prompt_ids)} tokens; this server's context holds "
                              f"{engine.max_seq_len} (prompt + max_tokens)", prompt_field(chat))
        return None

    async def answer(self, body: _Common, prompt_ids: list[int], chat: bool):
        """Submit the request; the whole answer, or a stream of server-sent events."""
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        refused = self.refusal(body, stops, prompt_ids, chat)
        if refused is not None:
            return refused
        sampling = self.sampling(body)
        max_tokens = body.max_tokens or body.max_completion_tokens or (
            self.engine.max_seq_len - len(prompt_ids) if chat else self.default_max_tokens)  # (chat: to the context)
        try:
            rid, events = await self.worker.submit(prompt_ids, max_tokens, sampling, stop_strings=stops)
        except QueueFull as e:
            return error(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"})
        except UserError as e:
            return error(400, str(e), refused_field(e, chat))
        reply = Reply(self.model_name, chat)
        if not body.stream:
            return await self.whole(reply, rid, events)
        holdback = max((len(s) for s in stops), default=0)
        return StreamingResponse(self.stream(reply, rid, events, holdback), media_type="text/event-stream")

    def final_text(self, req) -> str:
        return req.text if req.stop_strings else self.tokenizer.decode(req.output)

    async def whole(self, reply: Reply, rid: int, events):
        """Wait for the request to finish; its completion body (a client that goes away cancels it)."""
        try:
            while True:
                kind, item = await events.get()
                if kind == "done":
                    break
                if kind == "error":
                    return error(500, item, kind="server_error")
        except BaseException:
            self.worker.cancel(rid)
            raise
        return reply.whole(self.final_text(item), item)

    async def stream(self, reply: Reply, rid: int, events, holdback: int):
        """The request's text as chunks, then the finish reason and usage, then [DONE]."""
        ts = TextStream(self.tokenizer, holdback)
        finished = False
        try:
            if reply.chat:
                yield reply.role_chunk()
            while True:
                kind, item = await events.get()
                if kind == "tokens":
                    text = ts.push(item)
                    if text:
                        yield reply.chunk(text)
                elif kind == "error":
                    yield sse({"error": {"message": item, "type": "server_error"}})
                    finished = True
                    return
                else:
                    rest = ts.flush(self.final_text(item))
                    if rest:
                        yield reply.chunk(rest)
                    yield reply.chunk("", item.finish_reason, usage(item))
                    yield "data: [DONE]\n\n"
                    finished = True
                    return
        finally:
            if not finished:  # the client went away: free its pages
                self.worker.cancel(rid)
