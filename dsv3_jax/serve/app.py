"""The OpenAI-compatible HTTP API over an `EngineWorker` (FastAPI; `python serve.py` runs it with uvicorn).

    POST /v1/completions        prompt: a string, a list of strings, token ids or a list of token-id lists;
                                max_tokens (or max_completion_tokens), temperature (< 1e-5: greedy), top_p, top_k
                                (-1 / 0 / >= vocabulary: off), min_p, presence_penalty, frequency_penalty,
                                repetition_penalty, logit_bias, seed, n (1..16 choices per prompt), stop,
                                stop_token_ids, ignore_eos, min_tokens, include_stop_str_in_output, logprobs (0..20:
                                each token's log-probability and that many alternatives), echo (the prompt's text
                                and log-probabilities first), stream, stream_options.include_usage,
                                response_format (json_object, json_schema), structured_outputs (json, regex,
                                choice, grammar): output held to the grammar by token masks (structured.py)
    POST /v1/chat/completions   messages [{role, content}] (content: a string, null or text parts) through the
                                chat template (chat.py); the same fields, with logprobs (bool) + top_logprobs
    GET  /v1/models             the one served model
    GET  /health                200 when the engine thread is alive, 503 saying why otherwise
    POST /tokenize, /detokenize vLLM's: {prompt} or {messages} -> {tokens, count, max_model_len}; {tokens} -> {prompt}
    GET  /metrics               Prometheus text with vLLM's metric names under `dsv3:` (`Metrics`)

Every response carries `usage` (prompt tokens once per prompt, completion tokens over every choice). Streaming
answers are server-sent events in OpenAI's chunk format, one chunk per committed piece of text of a choice, a
final chunk per choice with its finish_reason (the last one with usage), a usage-only chunk when
stream_options.include_usage asks, then `data: [DONE]`. Errors have OpenAI's body {"error": {"message", "type",
"param", "code"}}: a malformed body or a field out of range is 400 naming the field, an unknown model 404, a full
queue 429 with Retry-After, a request whose engine step failed 500 (the engine goes on serving the others), a
dead engine 503. A client that disconnects cancels its request, streamed or not (its pages return to the pool).
A request without a seed samples from a fresh random one; a choice i of a seeded request uses seed + i.
"""
from __future__ import annotations

import asyncio
import functools
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dsv3_jax.cli import UserError
from dsv3_jax.data.bpe import EOS_ID
from dsv3_jax.infer.engine import MAX_LOGPROBS
from dsv3_jax.infer.sampling import SamplingParams
from dsv3_jax.serve.chat import TextStream, chat_ids, message_text, render_chat
from dsv3_jax.serve.guard import Guard
from dsv3_jax.serve.metrics import Metrics
from dsv3_jax.serve.reasoning import ReasoningSplit, prompt_opens_thinking
from dsv3_jax.serve.reply import Choice, Reply, sse, usage
from dsv3_jax.serve.structured import AfterReasoning
from dsv3_jax.serve.tools import PARSERS, ToolStream, call_grammar
from dsv3_jax.serve.worker import EngineDead, EngineWorker, QueueFull


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Common(BaseModel):
    """The fields every request shares, each bounded here (a value out of range is a 400 naming it, never an
    error inside the engine). Nullable as clients send them (`"temperature": null` means the default);
    `max_completion_tokens` is what current OpenAI SDKs send for `max_tokens`; `top_k` -1 (vLLM's "off") and any
    top_k at or past the vocabulary mean no top-k; a seed is any int64 (reduced mod 2**31 for the engine's int32
    keys), and a request without one gets a fresh random seed."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    include_stop_str_in_output: bool | None = None
    n: int | None = Field(default=None, ge=1, le=16)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    speculative: bool | None = None
    response_format: dict | None = None  # {"type": "text" | "json_object" | "json_schema", ...} (structured.py)
    structured_outputs: dict | None = None  # vLLM's: {"json" | "regex" | "choice" | "grammar": ...}
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict | None = None


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", headers=None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def build_app(worker: EngineWorker, tokenizer, model_name: str, *, chat_template=None,
              default_max_tokens: int = 16, eos_ids=(EOS_ID,), api_key: str | None = None,
              open_paths=("/health", "/metrics"), max_body: int = 32 * 2**20, tool_parser: str | None = None,
              reasoning: bool = False):
    """The app of `Routes` over `worker` (its finished requests feed the metrics), behind `Guard` (API key,
    body limit, request ids: guard.py); `eos_ids` end every request (unless it asks ignore_eos); `tool_parser`
    names the model's tool-call format (tools.PARSERS); `reasoning`: split <think> text into reasoning_content."""
    app = FastAPI(title="dsv3_jax", docs_url=None, redoc_url=None)
    routes = Routes(worker, tokenizer, model_name, chat_template, default_max_tokens, eos_ids, tool_parser, reasoning)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/v1/models", routes.models, methods=["GET"])
    app.add_api_route("/metrics", routes.metrics, methods=["GET"])
    app.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])
    app.add_api_route("/tokenize", routes.tokenize_route, methods=["POST"])
    app.add_api_route("/detokenize", routes.detokenize_route, methods=["POST"])
    return Guard(app, api_key=api_key, open_paths=open_paths, max_body=max_body)


async def bad_request(request: Request, exc: RequestValidationError):
    """400 naming the first field pydantic refused (or saying the body is not JSON)."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        msg, param = f"the body is not valid JSON: {msg}", None
    return error(400, f"{param}: {msg}" if param else msg, param)


def prompt_field(chat: bool) -> str:
    return "messages" if chat else "prompt"


def refused_field(e: UserError, chat: bool) -> str:
    """The request field a refused submit names: the error's `field` (the prompt is `messages` in a chat)."""
    return prompt_field(chat) if e.field in (None, "prompt") else e.field


class Refused(Exception):
    """A request this server will not run: its HTTP error response."""

    def __init__(self, response: JSONResponse):
        self.response = response


class Routes:
    """The routes over one `EngineWorker`, each a short method; `build_app` registers them."""

    def __init__(self, worker: EngineWorker, tokenizer, model_name: str, chat_template, default_max_tokens: int,
                 eos_ids=(EOS_ID,), tool_parser: str | None = None, reasoning: bool = False):
        self.worker, self.engine, self.tokenizer = worker, worker.engine, tokenizer
        self.model_name, self.chat_template, self.default_max_tokens = model_name, chat_template, default_max_tokens
        self.eos_ids = tuple(eos_ids)
        self.tool_parser, self.reasoning = tool_parser, reasoning
        self._grammars = None
        self.stats = Metrics(model_name)
        worker.on_finish, worker.on_tokens = self.stats.on_finish, self.stats.on_tokens
        # The longest token's text: a prompt of more characters than this times the context cannot fit, whatever
        # it tokenises to, so it is refused before tokenising.
        self.longest_token = max((len(t) for t in tokenizer.get_vocab()), default=1)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one Routes per server, alive as long as the process)
    def piece(self, token: int) -> str:
        """A token's text in logprobs: its decoded text; for a token that is part of a character (the text would
        be U+FFFD, the same for many tokens), its vocabulary string, so that top_logprobs keys stay distinct."""
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        return self.tokenizer.id_to_token(token) if "\ufffd" in text else text

    async def health(self):
        if self.worker.dead:
            return error(503, self.worker.why_dead(), kind="server_error")
        return {"status": "ok"}

    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "dsv3_jax",
                                            "created": 0, "max_model_len": self.engine.max_seq_len}]}

    async def metrics(self):
        return PlainTextResponse(self.stats.render(self.worker.stats()), media_type="text/plain; version=0.0.4")

    async def tokenize(self, text: str, chat: bool) -> list[int]:
        """Token ids of a prompt's text, off the event loop (a long prompt does not stall the running streams);
        a text too long for the context whatever it tokenises to is refused first."""
        if len(text) > self.engine.max_seq_len * self.longest_token:
            raise Refused(error(400, f"the prompt has {len(text)} characters: more than this server's context of "
                                     f"{self.engine.max_seq_len} tokens can hold", prompt_field(chat)))
        if chat:
            return await asyncio.to_thread(chat_ids, self.tokenizer, text)
        return (await asyncio.to_thread(self.tokenizer.encode, text)).ids

    async def chat_text(self, messages: list[Message], tools=None, kwargs: dict | None = None) -> str:
        """The rendered prompt; `tools` and the request's chat_template_kwargs (e.g. {"thinking": true}) reach the
        template as variables, as transformers passes them."""
        return render_chat([m.model_dump() | {"content": message_text(m.content)} for m in messages],
                           self.chat_template, tools=tools, **(kwargs or {}))

    async def tokenize_route(self, body: TokenizeRequest):
        """vLLM's /tokenize: a prompt (as completions tokenise it) or messages (through the chat template)."""
        if (body.prompt is None) == (body.messages is None):
            return error(400, "give exactly one of prompt and messages", "prompt")
        try:
            chat = body.messages is not None
            ids = await self.tokenize(await self.chat_text(body.messages) if chat else body.prompt, chat)
        except UserError as e:
            return error(400, str(e), "messages")
        except Refused as e:
            return e.response
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_seq_len}

    async def detokenize_route(self, body: DetokenizeRequest):
        if any(not 0 <= t < self.engine.cfg.vocab_size for t in body.tokens):
            return error(400, f"tokens: ids must be in [0, {self.engine.cfg.vocab_size})", "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    async def completions(self, body: CompletionRequest, request: Request):
        p = body.prompt
        if isinstance(p, str):
            p = [p]
        elif p and all(isinstance(x, int) for x in p):
            p = [p]
        if not p:
            return error(400, "prompt: the list is empty", "prompt")
        try:
            prompts = [(x, await self.tokenize(x, False)) if isinstance(x, str) else (self.tokenizer.decode(x), x)
                       for x in p]
        except Refused as e:
            return e.response
        return await self.answer(body, request, prompts, chat=False)

    def tool_refusal(self, body: ChatRequest) -> JSONResponse | None:
        choice = body.tool_choice
        if not (choice in (None, "auto", "none", "required") or isinstance(choice, dict)):
            return error(400, f"tool_choice={choice!r}: one of 'none', 'auto', 'required' or "
                              f"{{'type': 'function', 'function': {{'name': ...}}}}", "tool_choice")
        if (choice == "required" or isinstance(choice, dict)) and not body.tools:
            return error(400, f"tool_choice={choice!r} needs tools", "tool_choice")
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if name not in {(t.get("function") or {}).get("name") for t in body.tools}:
                return error(400, f"tool_choice names {name!r}, which is not one of the tools", "tool_choice")
        if (choice == "required" or isinstance(choice, dict)) and (body.response_format or body.structured_outputs):
            return error(400, "tool_choice 'required' or a named function already constrains the output; drop "
                              "response_format / structured_outputs", "tool_choice")
        if body.tools and choice != "none" and self.tool_parser is None:
            return error(400, "tools: this model has no tool-call format this server knows (start serve.py with "
                              f"--tool_parser, one of {sorted(PARSERS)})", "tools")
        for t in body.tools or ():
            if t.get("type") != "function" or not isinstance(t.get("function"), dict) or \
                    not isinstance(t["function"].get("name"), str):
                return error(400, "tools: each tool is {'type': 'function', 'function': {'name': ..., ...}}", "tools")
        return None

    async def chat_completions(self, body: ChatRequest, request: Request):
        refused = self.tool_refusal(body)
        if refused is not None:
            return refused
        kwargs = dict(body.chat_template_kwargs or {})
        if not all(isinstance(k, str) and k.isidentifier() and not k.startswith("_") for k in kwargs):
            return error(400, "chat_template_kwargs: keys must be plain names", "chat_template_kwargs")
        try:
            text = await self.chat_text(body.messages, body.tools, kwargs)
            prompts = [(text, await self.tokenize(text, True))]
        except UserError as e:
            return error(400, str(e), "messages")
        except Refused as e:
            return e.response
        return await self.answer(body, request, prompts, chat=True)

    def sampling(self, body: _Common, choice: int) -> SamplingParams:
        """Choice `choice`'s sampling, every value in the engine's range (see `_Common`)."""
        top_k = body.top_k or 0
        if top_k < 0 or top_k >= self.engine.cfg.vocab_size:
            top_k = 0
        seed = secrets.randbits(31) if body.seed is None else (body.seed + choice) % 2 ** 31
        t = 1.0 if body.temperature is None else body.temperature
        return SamplingParams(0.0 if t < 1e-5 else t, top_k, 1.0 if body.top_p is None else body.top_p, seed,
                              body.min_p or 0.0, body.presence_penalty or 0.0, body.frequency_penalty or 0.0,
                              1.0 if body.repetition_penalty is None else body.repetition_penalty,
                              tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()))

    def bad_logit_bias(self, body: _Common) -> JSONResponse | None:
        for k, v in (body.logit_bias or {}).items():
            if not k.isdigit() or int(k) >= self.engine.cfg.vocab_size or not -100 <= v <= 100:
                return error(400, f"logit_bias: {k!r}: {v} needs a token id in [0, {self.engine.cfg.vocab_size}) "
                                  f"and a bias in [-100, 100]", "logit_bias")
        return None

    def refusal(self, body: _Common, stops: list[str], prompts, chat: bool) -> JSONResponse | None:
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
        if any(not 0 <= t < engine.cfg.vocab_size for t in body.stop_token_ids or ()):
            return error(400, f"stop_token_ids: ids must be in [0, {engine.cfg.vocab_size})", "stop_token_ids")
        for _, ids in prompts:
            if len(ids) >= engine.max_seq_len:
                return error(400, f"the prompt has {len(ids)} tokens; this server's context holds "
                                  f"{engine.max_seq_len} (prompt + max_tokens)", prompt_field(chat))
        return self.bad_logit_bias(body)

    def structure(self, body: _Common) -> tuple[dict, str] | None:
        """(grammar spec, field) of a request asking for a structured output, None for free text. A chat's
        tool_choice 'required' or a named function is one: a tool section calling those tools (tools.call_grammar)."""
        choice = getattr(body, "tool_choice", None)
        if choice == "required" or isinstance(choice, dict):
            tools = body.tools if choice == "required" else [
                t for t in body.tools if t["function"]["name"] == choice["function"]["name"]]
            lark = call_grammar(PARSERS[self.tool_parser], tools, self.tokenizer.token_to_id,
                                parallel=choice == "required" and body.parallel_tool_calls is not False)
            return {"grammar": lark}, "tool_choice"
        rf = body.response_format
        if rf is not None and rf.get("type") not in (None, "text"):
            return rf, "response_format"
        if body.structured_outputs:
            return body.structured_outputs, "structured_outputs"
        return None

    def grammars(self):
        """The server's grammar engine (structured.Grammars), built on first use (it indexes the vocabulary)."""
        if self._grammars is None:
            from dsv3_jax.serve.structured import Grammars

            self._grammars = Grammars(self.tokenizer, self.engine.cfg.vocab_size, self.eos_ids)
        return self._grammars

    def engine_args(self, body: _Common, stops: list[str], reply: Reply) -> dict:
        stop_ids = tuple(body.stop_token_ids or ()) + (() if body.ignore_eos else self.eos_ids)
        return {"stop_strings": tuple(stops), "stop_ids": stop_ids, "min_tokens": body.min_tokens or 0,
                "include_stop_str": bool(body.include_stop_str_in_output), "logprobs": reply.top,
                "prompt_logprobs": reply.top if reply.echo else None}

    async def answer(self, body: _Common, request: Request, prompts: list[tuple[str | None, list[int]]], chat: bool):
        """Submit every choice (n per prompt); the whole answer, or a stream of server-sent events."""
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        refused = self.refusal(body, stops, prompts, chat)
        if refused is not None:
            return refused
        reply = Reply(self, body, chat)
        n = body.n or 1
        choices = [Choice(i * n + j, ids, text) for i, (text, ids) in enumerate(prompts) for j in range(n)]
        if chat:
            for c in choices:
                if self.reasoning:
                    c.split = ReasoningSplit(open_at_start=prompt_opens_thinking(c.prompt_text))
                if body.tools and body.tool_choice != "none":
                    c.tools = ToolStream(PARSERS[self.tool_parser])
        kw = self.engine_args(body, stops, reply)
        spec = self.structure(body)
        for c in choices:
            if spec is not None:
                try:
                    kw["constraint"] = self.grammars().make(*spec)
                    end = self.tokenizer.token_to_id("</think>")
                    if c.split is not None and c.split.open_at_start and end is not None:
                        kw["constraint"] = AfterReasoning(kw["constraint"], end)  # think first, then the format
                except UserError as e:
                    self.cancel_all([x for x in choices if x.events is not None])
                    return error(400, str(e), e.field)
            max_tokens = body.max_tokens or body.max_completion_tokens or (
                self.engine.max_seq_len - len(c.prompt_ids) if chat else self.default_max_tokens)  # (chat: to the end)
            try:
                c.rid, c.events = await self.worker.submit(c.prompt_ids, max_tokens, self.sampling(body, c.index % n),
                                                           **kw)
            except (QueueFull, UserError, EngineDead) as e:
                for other in choices:
                    if other.events is not None:
                        self.worker.cancel(other.rid)
                if isinstance(e, QueueFull):
                    return error(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"})
                if isinstance(e, EngineDead):
                    return error(503, str(e), kind="server_error")
                return error(400, str(e), refused_field(e, chat))
        if not body.stream:
            return await self.whole(reply, choices, request)
        holdback = max((len(s) for s in stops), default=0)
        for c in choices:
            c.stream = TextStream(self.tokenizer, holdback)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self.stream(reply, choices, include_usage), media_type="text/event-stream")

    def final_text(self, req) -> str:
        return req.text if req.stop_strings else self.tokenizer.decode(req.output)

    async def whole(self, reply: Reply, choices: list[Choice], request: Request):
        """Wait for every choice to finish; the completion body. A client that goes away (looked for every half
        second) cancels its requests."""
        looked = time.monotonic()
        try:
            for c in choices:
                while c.req is None:
                    try:
                        kind, item, *_ = await asyncio.wait_for(c.events.get(), 0.5)
                    except TimeoutError:
                        kind = item = None
                    if time.monotonic() - looked >= 0.5:  # (events keep coming while it decodes)
                        looked = time.monotonic()
                        if await request.is_disconnected():
                            raise ConnectionAbortedError("the client went away") from None
                    if kind is None:
                        continue
                    if kind == "error":
                        raise RuntimeError(item)
                    if kind == "done":
                        if item.finish_reason == "error":
                            raise RuntimeError(f"the engine step running this request failed: {item.error}")
                        c.req = item
        except RuntimeError as e:
            self.cancel_all(choices)
            return error(500, str(e), kind="server_error")
        except ConnectionAbortedError as e:  # no one reads this; 499 is "client closed the request" in logs
            self.cancel_all(choices)
            return error(499, str(e))
        except BaseException:
            self.cancel_all(choices)
            raise
        return reply.whole(choices)

    def cancel_all(self, choices: list[Choice]):
        for c in choices:
            if c.req is None:
                self.worker.cancel(c.rid)

    async def stream(self, reply: Reply, choices: list[Choice], include_usage: bool):
        """Each choice's text as chunks, then its finish reason (the last one with usage), then [DONE]."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice):
            while True:
                ev = await c.events.get()
                merged.put_nowait((c, ev))
                if ev[0] != "tokens":
                    return

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            for c in choices:
                if reply.chat:
                    yield reply.role_chunk(c)
            left = len(choices)
            while left:
                c, (kind, item, *more) = await merged.get()
                if kind == "tokens":
                    text, lps, req = more
                    if reply.echo and c.stream.ids == []:  # the prompt first (it has run: a token follows it)
                        yield reply.chunk(c, c.prompt_text, logprobs=reply.logprobs([], [], Choice(
                            c.index, c.prompt_ids, c.prompt_text, req=req)) if reply.top is not None else None)
                    out = c.stream.push(item, text)
                    lp = reply.logprobs(item, lps or [], offset=len(c.stream.sent) - len(out)) if lps else None
                    if not reply.chat:
                        if out or lp:
                            yield reply.chunk(c, out, logprobs=lp)
                        continue
                    deltas = reply.deltas(c, c.stream.sent, final=False) if out else []
                    for k, delta in enumerate(deltas or ([{}] if lp else [])):
                        yield reply.delta_chunk(c, delta, logprobs=lp if k == 0 else None)
                    continue
                if kind == "error" or item.finish_reason == "error":
                    message = item if kind == "error" else f"the engine step running this request failed: {item.error}"
                    yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": 500}})
                    return
                c.req, left = item, left - 1
                rest = c.stream.flush(self.final_text(item))
                use = usage(choices) if not left else None
                if not reply.chat:
                    if rest:
                        yield reply.chunk(c, rest)
                    yield reply.chunk(c, "", item.finish_reason, use)
                    continue
                for delta in reply.deltas(c, c.stream.sent, final=True):
                    yield reply.delta_chunk(c, delta)
                finish = "tool_calls" if c.tools is not None and c.tools.called else item.finish_reason
                yield reply.delta_chunk(c, {}, finish, use)
            if include_usage:
                yield sse(reply.head([], usage(choices), chunk=True))
            yield "data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            self.cancel_all(choices)  # a client that went away (or an error): free the pages of the rest
