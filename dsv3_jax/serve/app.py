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
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
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
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    app = FastAPI(title="dsv3_jax", docs_url=None, redoc_url=None)
    engine = worker.engine
    reg = CollectorRegistry()
    m_prompt = Counter("dsv3_prompt_tokens", "Prompt tokens of finished requests", registry=reg)
    m_gen = Counter("dsv3_generated_tokens", "Generated tokens of finished requests", registry=reg)
    m_req = Counter("dsv3_requests_finished", "Finished requests", ["finish_reason"], registry=reg)
    m_drafted = Counter("dsv3_spec_drafted", "MTP drafts verified", registry=reg)
    m_accepted = Counter("dsv3_spec_accepted", "MTP drafts accepted", registry=reg)
    m_ttft = Histogram("dsv3_time_to_first_token_seconds", "Time to first token", registry=reg,
                       buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    m_itl = Histogram("dsv3_inter_token_latency_seconds", "Mean gap between a request's tokens", registry=reg,
                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
    gauges = {k: Gauge(f"dsv3_{k}", f"{k.replace('_', ' ')} (engine)", registry=reg)
              for k in ("running", "waiting", "pages_used", "pages_free", "prefix_hits", "preemptions")}

    def on_finish(req):  # engine thread
        m_prompt.inc(len(req.prompt))
        m_gen.inc(len(req.output))
        m_req.labels(req.finish_reason or "unknown").inc()
        m_drafted.inc(req.drafted)
        m_accepted.inc(req.accepted)
        if req.token_times and req.started is not None:
            m_ttft.observe(max(0.0, req.token_times[0] - req.arrival))
        if len(req.token_times) > 1:
            m_itl.observe((req.token_times[-1] - req.token_times[0]) / (len(req.token_times) - 1))

    worker.on_finish = on_finish

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, param = f"the body is not valid JSON: {msg}", None
        return error(400, f"{param}: {msg}" if param else msg, param)

    @app.get("/health")
    async def health():
        if worker.error is not None or not worker.thread.is_alive():
            return error(503, f"the engine thread stopped: {worker.error!r}", kind="server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "dsv3_jax",
                                            "created": 0}]}

    @app.get("/metrics")
    async def metrics():
        for k, v in worker.stats().items():
            if k in gauges:
                gauges[k].set(v)
        return PlainTextResponse(generate_latest(reg).decode(), media_type="text/plain; version=0.0.4")

    async def run(body: _Common, prompt_ids: list[int], chat: bool):
        if body.model != model_name:
            return error(404, f"model {body.model!r} does not exist; this server serves {model_name!r}", "model",
                         kind="not_found_error")
        if body.speculative is not None and body.speculative != engine.speculative:
            return error(400, f"speculative={body.speculative}: this server runs speculative={engine.speculative} "
                              f"(start it with --speculative to change that)", "speculative")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stops):
            return error(400, "stop: stop strings must be non-empty", "stop")
        sampling = SamplingParams(body.temperature, body.top_k, body.top_p, body.seed or 0)
        max_tokens = body.max_tokens or default_max_tokens
        if len(prompt_ids) >= engine.max_seq_len:
            return error(400, f"the prompt has {len(prompt_ids)} tokens; this server's context holds "
                              f"{engine.max_seq_len} (prompt + max_tokens)", "messages" if chat else "prompt")
        try:
            rid, events = await worker.submit(prompt_ids, max_tokens, sampling, stop_strings=stops)
        except QueueFull as e:
            return error(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"})
        except UserError as e:
            param = "max_tokens" if "max_tokens" in str(e) else ("messages" if chat else "prompt")
            return error(400, str(e), param)
        created, cid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        holdback = max((len(s) for s in stops), default=0)

        def usage(req):
            return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.output),
                    "total_tokens": len(req.prompt) + len(req.output)}

        def final_text(req):
            return req.text if req.stop_strings else tokenizer.decode(req.output)

        if not body.stream:
            try:
                while True:
                    kind, item = await events.get()
                    if kind == "done":
                        req = item
                        break
                    if kind == "error":
                        return error(500, item, kind="server_error")
            except BaseException:
                worker.cancel(rid)
                raise
            text = final_text(req)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                      else {"index": 0, "text": text, "logprobs": None})
            choice["finish_reason"] = req.finish_reason
            return {"id": cid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                    "usage": usage(req)}

        def chunk(text, finish=None, use=None):
            if chat:
                delta = {"content": text} if text else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            out = {"id": cid, "object": obj + (".chunk" if chat else ""), "created": created, "model": model_name,
                   "choices": [choice]}
            if use is not None:
                out["usage"] = use
            return f"data: {json.dumps(out)}\n\n"

        async def stream():
            ts = TextStream(tokenizer, holdback)
            finished = False
            try:
                if chat:
                    yield f"data: {json.dumps({'id': cid, 'object': obj + '.chunk', 'created': created, 'model': model_name, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"  # noqa: E501
                while True:
                    kind, item = await events.get()
                    if kind == "tokens":
                        text = ts.push(item)
                        if text:
                            yield chunk(text)
                    elif kind == "error":
                        yield f"data: {json.dumps({'error': {'message': item, 'type': 'server_error'}})}\n\n"
                        finished = True
                        return
                    else:
                        req = item
                        rest = ts.flush(final_text(req))
                        if rest:
                            yield chunk(rest)
                        yield chunk("", req.finish_reason, usage(req))
                        yield "data: [DONE]\n\n"
                        finished = True
                        return
            finally:
                if not finished:  # the client went away: free its pages
                    worker.cancel(rid)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        ids = body.prompt if isinstance(body.prompt, list) else tokenizer.encode(body.prompt).ids
        return await run(body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        text = render_chat([m.model_dump() for m in body.messages], chat_template)
        return await run(body, tokenizer.encode(text).ids, chat=True)

    return app
