"""Continuous-batching scheduler: which requests run in the next engine step, with how many tokens, on which
pages. Host-side only (no JAX); `engine.py` turns its plan into device steps.

A request's sequence is prompt + output. `computed` counts the leading tokens of it whose latents are in the
cache; the request's next forward covers sequence[computed:], and the logits of its last token give the next
output token. So a request with one token to do (its last emitted token) is a decode row, and one with more
(a prompt, or a preempted request's prompt + output) is a prefill row, processed in chunks.

Per step, in admission order:
  * decode rows take one token of the `max_batch_tokens` budget each (the engine may run several decode
    steps per dispatch: `lookahead` positions are reserved);
  * prefill rows get chunks of what is left of the budget (`max_prefill_chunk` at most each), so a long
    prompt never stalls the decoders for more than one step;
  * waiting requests join while the batch has room (`max_batch` rows), reusing cached prefix pages (full
    pages of an identical token prefix, reference-counted, see paged_cache.py) and skipping their prefill;
  * pages are allocated for every position a step writes; when the pool runs dry the newest running request
    (the latest arrival, which may be the one asking) is preempted, never an older one for a newer one: its
    pages go back, it returns to the front of the queue (older victims ahead of newer ones), and it is
    recomputed later from prompt + the output it already has (no token is lost, emitted twice or changed).
A request that could never fit the pool alone is refused when it is submitted.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

from dsv3_jax.infer.paged_cache import PagePool, PoolExhausted, page_keys
from dsv3_jax.infer.sampling import SamplingParams


@dataclasses.dataclass
class Request:
    rid: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: frozenset = frozenset()
    stop_strings: tuple = ()
    on_tokens: Callable | None = None  # on_tokens(request, new_token_ids)
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    output: list[int] = dataclasses.field(default_factory=list)
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0
    finish_reason: str | None = None  # 'stop' | 'length' | 'cancelled' | 'error' (then `error` says what failed)
    error: str | None = None
    logprobs: int | None = None  # report each output token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (no prefix-cache hits then)
    min_tokens: int = 0  # stop tokens and stop strings do not end the request before this many tokens
    constraint: object = None  # a structured output's grammar state: allowed() -> [V] bool, advance(token), done
    include_stop_str: bool = False  # `text` keeps the stop string that ended the request
    token_logprobs: list = dataclasses.field(default_factory=list)  # per output token: (logprob, [(id, logprob)])
    prompt_lps: list | None = None  # per prompt token (the first: None), as token_logprobs
    token_times: list[float] = dataclasses.field(default_factory=list)
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    drafted: int = 0
    accepted: int = 0
    draft: int = 0  # MTP speculation: the drafted token after the pending one, and its distribution
    draft_q: object = None
    text: str = ""  # detokenised output (only with stop strings)
    started: float | None = None  # first scheduled
    compile_at_start: float = 0.0  # the engine's compile seconds then
    seconds: float = 0.0  # first scheduled -> finished, less the compilation in between

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.output

    @property
    def todo(self) -> int:
        return len(self.prompt) + len(self.output) - self.computed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class Work:
    """One row of a step: `n` tokens of `request` from position `start`; `sample` when its last is the end."""

    request: Request
    start: int
    n: int

    @property
    def sample(self) -> bool:
        return self.start + self.n == len(self.request.prompt) + len(self.request.output)


class Scheduler:
    def __init__(self, pool: PagePool, *, max_batch: int, max_batch_tokens: int, max_prefill_chunk: int,
                 lookahead: int = 1, prefix_sharing: bool = True, key_extra: int = 0):
        self.pool = pool
        self.max_batch, self.max_batch_tokens = max_batch, max_batch_tokens
        self.max_prefill_chunk, self.lookahead = max_prefill_chunk, lookahead
        self.prefix_sharing, self.key_extra = prefix_sharing, key_extra
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.prefix_queries = self.prefix_hits = 0  # tokens looked up in the prefix table, and found

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def pages_needed(self, tokens: int) -> int:
        return -(-tokens // self.pool.page_size)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._free(req)

    def _free(self, req: Request) -> None:
        self.pool.release(req.pages)
        req.pages = []

    def preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.computed = 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _admit(self, req: Request) -> bool:
        """Move a waiting request into the batch, reusing cached prefix pages; False (and nothing changed)
        when the pool cannot hold its first chunk now."""
        hit = []
        if self.prefix_sharing and req.prompt_logprobs is None:  # (prompt log-probabilities need every position run)
            seq = req.sequence
            # Only pages strictly before the last token: that token must run to give the next one's logits.
            hit = self.pool.lookup(page_keys(seq[: len(seq) - 1], self.pool.page_size, self.key_extra))
        start = len(hit) * self.pool.page_size
        first = min(len(req.sequence), start + self.max_prefill_chunk)
        if self.pages_needed(first) - len(hit) > self.pool.available:
            self.pool.release(hit)
            self.pool.hits -= len(hit)
            return False
        if self.prefix_sharing and req.prompt_logprobs is None:
            self.prefix_queries += len(req.sequence)
            self.prefix_hits += start
        req.pages, req.computed = hit, start
        req.prefix_hit_tokens += start
        self.running.append(req)
        return True

    def _ensure_pages(self, req: Request, upto: int) -> None:
        """Allocate pages so that positions [0, upto) of req have a page, preempting newer requests if needed.
        Raises PoolExhausted when req itself is the newest running request (it is the one to give way)."""
        need = self.pages_needed(upto) - len(req.pages)
        while need > 0:
            try:
                req.pages += self.pool.allocate(need)
                return
            except PoolExhausted:
                newest = max(self.running, key=lambda r: r.rid)  # request ids count arrivals
                if newest is req:
                    raise
                self.preempt(newest)

    def register_prefix(self, req: Request) -> None:
        """Register the request's full pages that hold prompt tokens only (written, so reusable)."""
        if not self.prefix_sharing:
            return
        G, extra = self.pool.page_size, self.key_extra
        full = min(req.computed, len(req.prompt) - extra) // G
        for i, key in enumerate(page_keys(req.prompt[: full * G + extra], G, extra)):
            self.pool.register(key, req.pages[i])

    def schedule(self) -> list[Work]:
        """The rows of the next step (decode rows first, then prefill chunks, in admission order)."""
        while self.waiting and len(self.running) < self.max_batch:
            if not self._admit(self.waiting[0]):
                break  # first come, first served: wait for pages to free
            self.waiting.popleft()
        budget = self.max_batch_tokens
        work: list[Work] = []
        for req in list(self.running):
            if req not in self.running:  # preempted while making room for an earlier row
                continue
            if req.todo == 1:
                n = 1
            else:
                n = min(req.todo, self.max_prefill_chunk, budget)
                if n <= 0:
                    continue
            try:
                extra = self.lookahead - 1 if req.todo == 1 else 0
                self._ensure_pages(req, req.computed + n + extra)
            except PoolExhausted:
                self.preempt(req)
                continue
            budget -= n
            work.append(Work(req, req.computed, n))
        live = set(map(id, self.running))
        return [w for w in work if id(w.request) in live]
