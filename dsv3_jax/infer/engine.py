"""The serving engine: continuous batching over the paged latent cache, chunked prefill, per-request sampling.

    engine = Engine(model, page_size=16, max_batch=16, max_batch_tokens=256, cache_bytes=2**30)
    rid = engine.submit(prompt_ids, max_tokens=64, sampling=SamplingParams(...), stop_ids=(1,))
    while not engine.idle:
        engine.step()                                  # one scheduled step; callbacks stream tokens
    engine.result(rid)                                 # -> the finished Request
    engine.generate(prompts, max_new_tokens, sampling) # a static batch: all submitted, run to completion

Each step (`step`) asks the scheduler (scheduler.py) for rows, then runs at most two compiled functions:
  * prefill: the rows with more than one token to do, `[Bp, T]` tokens at their positions (padding at
    position -1 writes to the trash page), through the model's absorbed decode path over the paged cache
    (paged_cache.py), sampling the next token where a row's chunk ends its sequence;
  * decode: the rows with one token to do, `decode_steps` tokens each in one dispatch (a `lax.scan` that
    feeds each sampled token back on the device), so the host reads tokens once per `decode_steps`.
Shapes are bucketed (rows and prefill lengths to powers of two, page tables to powers of two pages), so
the number of compilations is bounded by the buckets a workload touches (`compilations`).

Sampling is per request: temperature, top_k, top_p, min_p and a seed; the key of a request's j-th output token is
fold_in(PRNGKey(seed), j), so a request's tokens do not depend on what it is batched with. Stop token ids
end a request without emitting the stop token; stop strings (with a tokenizer) end it at the first
occurrence in the detokenised output: `Request.text` is cut before it, the token ids run up to the token the
stop string starts in (tokens already streamed are never taken back); `max_tokens` ends it with 'length'.

This is the one decoder: infer.py, serve.py, train.py's closing sample, the notebooks and the benchmarks all
decode through it (static batches too: `generate`). Determinism: in float32 a request's greedy tokens equal
those of repeated full forwards over its prompt alone (tests/reference/decoding.py; tested with staggered
arrivals, mixed lengths, forced preemption, prefix hits, MTP speculation and a device mesh).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax import sharding
from dsv3_jax.cli import UserError
from dsv3_jax.data.bpe import EOS_ID
from dsv3_jax.infer import steps
from dsv3_jax.infer.paged_cache import PagedLatentCache, PagePool, pages_for_budget
from dsv3_jax.infer.sampling import SamplingParams
from dsv3_jax.infer.scheduler import Request, Scheduler, Work
from dsv3_jax.model import DeepSeekV3, ModelCache, with_runtime


@dataclasses.dataclass
class Completion:
    """One prompt's result from `Engine.generate`. `seconds` is the wall time of the whole call, less compilation."""

    tokens: list[int]
    prompt_len: int
    finish_reason: str  # "stop" (a stop token, not included in `tokens`) or "length"
    seconds: float
    drafted: int = 0  # speculative verify steps for this row
    accepted: int = 0  # drafts the main model accepted


MAX_LOGPROBS = 20  # most alternatives a request may ask for; a step that reports any computes this many (one shape)


def _bucket(n: int, smallest: int = 1) -> int:
    """The power of two >= max(n, smallest)."""
    b = smallest
    while b < n:
        b *= 2
    return b


def _bucket4(n: int) -> int:
    """Prefill lengths: 16, 64, 256, ... (few shapes; a chunk pads at most to 4x, usually far less)."""
    b = 16
    while b < n:
        b *= 4
    return b


def _on_mesh(run):
    """An Engine method that dispatches steps, run under the engine's mesh when it has one (`jax.set_mesh`), so
    that kernels which must run per device (the FP8 GEMMs: fp8/gemm.py) split themselves over it."""

    @functools.wraps(run)
    def wrapped(self, *args):
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            return run(self, *args)

    return wrapped


def pool_shardings(pools: ModelCache, mesh):
    """Where the page pools live on a mesh: split over 'stage' by layer (the stacks' leading axis), otherwise
    replicated (every device can read every page a row's table names)."""
    from jax.sharding import NamedSharding, PartitionSpec

    def spec(c):
        lead = (sharding.logical_to_spec(("layers",))[0],) if c.c_kv.ndim == 4 else ()
        s = NamedSharding(mesh, PartitionSpec(*lead))
        fp8 = c.k_idx is not None
        return PagedLatentCache(s, s, NamedSharding(mesh, PartitionSpec()), s if fp8 else None, s if fp8 else None)

    return jax.tree.map(spec, pools, is_leaf=lambda x: isinstance(x, PagedLatentCache))


def _row_logprobs(lps, i) -> list | None:
    """One row's (logprob, [(id, logprob)]) per token from a step's host arrays (logprob [..., n], ids and values
    [..., n, K]), or None when the step reported none."""
    if lps is None:
        return None
    lp, ids, vals = (np.asarray(x[i]) for x in lps)
    lp, ids, vals = np.atleast_1d(lp), np.atleast_2d(ids), np.atleast_2d(vals)
    return [(float(lp[t]), list(zip(ids[t].tolist(), vals[t].tolist()))) for t in range(lp.shape[0])]


class Engine:
    """Continuous batching for one model. See the module docstring.

    page_size: tokens per cache page; max_batch: rows per step; max_batch_tokens: tokens per step (decode
    rows count one each, prefill chunks take the rest); max_prefill_chunk: longest chunk of one prompt per
    step (default: max_batch_tokens); cache_bytes: device memory for the page pool (or `pages` directly);
    decode_steps: decode tokens per dispatch; cache_dtype: dtype of the cached latent (default: compute);
    prefix_sharing: reuse cached full pages of identical prompt prefixes; paged_attention: how attention reads
    the pages, 'jnp' | 'pallas' | 'auto' (`runtime.paged_attention_impl`); index_fp8: a sparse-attention model's
    indexer keys cached as E4M3 with a per-token scale (`paged_cache`), not in the cache dtype.
    """

    def __init__(self, model: DeepSeekV3, *, page_size: int = 16, max_batch: int = 16, max_batch_tokens: int = 256,
                 max_prefill_chunk: int | None = None, cache_bytes: int | None = None, pages: int | None = None,
                 decode_steps: int = 4, cache_dtype=None, prefix_sharing: bool = True, tokenizer=None,
                 speculative: bool = False, mesh=None, max_seq_len: int | None = None, paged_attention: str = "auto",
                 index_fp8: bool = False):
        cfg = model.cfg
        self.cfg = cfg
        for name, v in (("page_size", page_size), ("max_batch", max_batch), ("max_batch_tokens", max_batch_tokens),
                        ("decode_steps", decode_steps)):
            if v < 1:
                raise UserError(f"engine: {name}={v} must be >= 1")
        if max_batch_tokens < max_batch:
            raise UserError(f"engine: max_batch_tokens={max_batch_tokens} must be >= max_batch={max_batch} (each "
                            f"decoding request takes one token of a step)")
        self.page_size, self.max_batch, self.decode_steps = page_size, max_batch, decode_steps
        self.speculative = bool(speculative)
        if self.speculative and not len(model.mtp):
            raise UserError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1)")
        self.cache_dtype = jnp.dtype(cfg.compute_dtype if cache_dtype is None else cache_dtype)
        if index_fp8 and not cfg.dsa:
            raise UserError("engine: index_fp8 caches a sparse-attention model's indexer keys in FP8; this model has "
                            "no indexer (index_topk=0)", key="index_fp8")
        self.index_fp8 = bool(index_fp8)
        if pages is None:
            if cache_bytes is None:
                raise UserError("engine: give the page pool a size: cache_bytes (device memory for the latent cache) "
                                "or pages")
            pages = pages_for_budget(cfg, cache_bytes, page_size, self.cache_dtype.itemsize, self.speculative,
                                     self.index_fp8)
        if pages < 2:
            raise UserError(f"engine: a cache budget of {cache_bytes} bytes holds {pages} pages of {page_size} tokens; "
                            f"at least 2 are needed (raise the budget or lower the page size)")
        self.pool = PagePool(pages, page_size)
        self.scheduler = Scheduler(self.pool, max_batch=max_batch, max_batch_tokens=max_batch_tokens,
                                   max_prefill_chunk=max_prefill_chunk or max_batch_tokens,
                                   lookahead=decode_steps * (2 if self.speculative else 1),
                                   prefix_sharing=prefix_sharing, key_extra=int(self.speculative))
        self.tokenizer = tokenizer
        # Every step's page tables have one width: the pages of the longest request (prompt + max_tokens +
        # the decode lookahead), so compiled shapes depend on rows and prefill length only.
        self.max_seq_len = int(max_seq_len or cfg.max_position_embeddings)
        if not 0 < self.max_seq_len <= cfg.max_position_embeddings:
            raise UserError(f"engine: max_seq_len={self.max_seq_len} must be in [1, max_position_embeddings="
                            f"{cfg.max_position_embeddings}]")
        self.table_width = _bucket(self.scheduler.pages_needed(self.max_seq_len + self.scheduler.lookahead))
        self.runtime = model.runtime.for_engine(paged_attention)
        if cfg.dsa and self.runtime.paged_attention == "pallas":
            raise UserError("engine: paged_attention='pallas' reads every slot up to a row's position; a sparse-"
                            "attention model (index_topk > 0) is served with paged_attention='jnp'.",
                            key="paged_attention")
        self.decode_runtime = self.runtime.for_decode()
        self.graphdef, self.state = nnx.split(with_runtime(model, self.runtime))
        self.decode_graphdef = nnx.split(with_runtime(model, self.decode_runtime))[0]
        # A mesh: parameters placed by the logical-axis rules, the page pools split over 'stage' by layer and
        # otherwise replicated, each step's rows split over the batch axes (XLA partitions the steps). No mesh:
        # everything on one device (a model trained or loaded on a mesh is copied there).
        self.mesh = None if mesh is None else sharding.auto_mesh(mesh)
        self.batch_multiple = 1
        if self.mesh is None:
            self.state = jax.device_put(self.state, jax.devices()[0])
        else:
            self.state = jax.device_put(self.state, sharding.state_shardings(self.state, self.mesh))
            self.batch_multiple = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES
                                            if a in self.mesh.axis_names)
        self.pools = self._empty_pools()
        # Committed placement from the start: the pools a step returns are committed, and a step given an
        # uncommitted array the first time would compile twice.
        self.pools = jax.device_put(self.pools, jax.devices()[0] if self.mesh is None else self._pool_shardings())
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._compiled: set = set()
        self.compile_seconds = 0.0
        self.steps = 0

    @classmethod
    def for_batch(cls, model: DeepSeekV3, batch: int, seq_len: int, **kw) -> Engine:
        """An engine sized for a static batch: `batch` rows at once, each up to `seq_len` tokens (prompt + new;
        capped at the model's context, so a longer request fails in `submit` naming the context), its pool
        holding all of them; `kw` as for `Engine` (page_size, decode_steps, speculative, ...)."""
        seq_len = min(int(seq_len), model.cfg.max_position_embeddings)
        page_size = kw.get("page_size", 16)
        lookahead = kw.get("decode_steps", 4) * (2 if kw.get("speculative") else 1)
        kw.setdefault("max_batch_tokens", max(256, batch))
        pages = batch * -(-(seq_len + lookahead) // page_size) + 1  # + the trash page
        return cls(model, max_batch=batch, max_seq_len=seq_len, pages=pages, **kw)

    def _empty_pools(self) -> ModelCache:
        cfg = self.cfg
        stack = lambda n: (PagedLatentCache.zeros(cfg, self.pool.pages, self.page_size, self.cache_dtype, n,  # noqa
                                                  self.index_fp8) if n != 0 else None)
        return ModelCache(dense=stack(cfg.num_dense_layers), moe=stack(cfg.num_moe_layers),
                          mtp=stack(None) if self.speculative else None)

    # ------------------------------------------------------------------ placement
    def _pool_shardings(self):
        return pool_shardings(self.pools, self.mesh)

    def _rows(self, n: int) -> int:
        """Rows of a step: a power of two, and a multiple of the mesh's batch shards."""
        b = _bucket(n)
        return -(-b // self.batch_multiple) * self.batch_multiple

    def _put(self, *arrays):
        """Host arrays of a step: rows split over the batch axes (page tables too), on the mesh."""
        if self.mesh is None:
            return arrays
        from jax.sharding import NamedSharding, PartitionSpec

        batch = NamedSharding(self.mesh, PartitionSpec(sharding.BATCH_AXES))
        return tuple(jax.device_put(a, batch) for a in arrays)

    def _note_compile(self, kind, *shapes):
        key = (kind,) + shapes
        if key not in self._compiled:
            self._compiled.add(key)
            return True
        return False

    @property
    def compilations(self) -> int:
        return len(self._compiled)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: Sequence[int], max_tokens: int, sampling: SamplingParams = SamplingParams(), *,
               stop_ids: Sequence[int] = (EOS_ID,), stop_strings: Sequence[str] = (),
               on_tokens: Callable | None = None, logprobs: int | None = None,
               prompt_logprobs: int | None = None, min_tokens: int = 0, include_stop_str: bool = False,
               constraint=None) -> int:
        """Queue a request; returns its id. Bad input raises UserError before anything runs. `logprobs` (0 ..
        MAX_LOGPROBS): record each output token's log-probability and that many most likely alternatives
        (`Request.token_logprobs`); `prompt_logprobs`: the same for the prompt's tokens (`Request.prompt_lps`).
        `min_tokens`: no stop token or stop string ends the request before it has this many tokens;
        `include_stop_str`: `Request.text` keeps the stop string that ended it. `constraint`: a grammar state
        (serve/structured.py's `Grammar`: `allowed()` -> [V] bool, `advance(token)` -> bool, `done`): every token
        is drawn from the tokens it allows, one token per dispatch, and the request ends when it is done."""
        cfg = self.cfg
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise UserError("prompt is empty: it needs at least one token", field="prompt")
        if max_tokens < 1:
            raise UserError(f"max_tokens={max_tokens} must be >= 1", field="max_tokens")
        if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            raise UserError(f"prompt has token ids outside [0, {cfg.vocab_size})", field="prompt")
        total = len(prompt) + max_tokens
        if total > self.max_seq_len:
            what = ("the model's context" if self.max_seq_len == cfg.max_position_embeddings
                    else "the engine's max_seq_len")
            raise UserError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = {total} exceeds {what} of "
                            f"{self.max_seq_len} tokens", field="max_tokens")
        need = self.scheduler.pages_needed(total + self.scheduler.lookahead)
        if need > self.pool.pages - 1:
            raise UserError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) needs {need} cache pages of "
                            f"{self.page_size} tokens but the pool holds {self.pool.pages - 1}; raise the cache budget",
                            field="max_tokens")
        for name, v in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise UserError(f"{name}={v} must be in [0, {MAX_LOGPROBS}]", field=name)
        if not 0 <= min_tokens <= max_tokens:
            raise UserError(f"min_tokens={min_tokens} must be in [0, max_tokens={max_tokens}]", field="min_tokens")
        if self.speculative and sampling.penalized:
            raise UserError("presence/frequency/repetition penalties and logit_bias are not supported with MTP "
                            "speculation (start the server without --speculative to use them)",
                            field="presence_penalty")
        if any(not 0 <= t < cfg.vocab_size for t, _ in sampling.logit_bias):
            raise UserError(f"logit_bias: token ids must be in [0, {cfg.vocab_size})", field="logit_bias")
        if stop_strings and self.tokenizer is None:
            raise UserError("stop strings need the engine's tokenizer (Engine(..., tokenizer=...))", field="stop")
        rid = next(self._ids)
        req = Request(rid, prompt, max_tokens, sampling, frozenset(int(t) for t in stop_ids), tuple(stop_strings),
                      on_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs, min_tokens=min_tokens,
                      include_stop_str=include_stop_str, constraint=constraint)
        if prompt_logprobs is not None:
            req.prompt_lps = [None] * len(prompt)
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def cancel(self, rid: int) -> None:
        req = self.requests[rid]
        if not req.done:
            self.scheduler.finish(req, "cancelled")

    def result(self, rid: int) -> Request:
        return self.requests[rid]

    def release(self, rid: int) -> None:
        """Forget a finished request (its tokens, and a speculative row's draft distribution): without this
        every request served stays in `requests`. A request still running is cancelled first."""
        req = self.requests.pop(rid, None)
        if req is not None and not req.done:
            self.scheduler.finish(req, "cancelled")

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    # ------------------------------------------------------------------ one step
    def step(self) -> list[Request]:
        """Run one scheduled step; returns the requests that finished in it. If the step raises, the requests in it
        fail (finish_reason 'error', `Request.error` says why) and the engine recovers (`_recover`): one bad step
        never takes the other requests down with it."""
        work = self.scheduler.schedule()
        if not work:
            return []
        try:
            return self._step(work)
        except Exception as e:  # noqa: BLE001 (any failure of a step is isolated to its requests)
            return self._recover(work, e)

    def _recover(self, work: list[Work], exc: Exception) -> list[Request]:
        """Fail the requests of a step that raised; if the step's donated page pools are gone, make new (empty)
        ones and send every other running request back to the queue to be recomputed (no token is lost)."""
        failed = []
        for w in work:
            req = w.request
            if not req.done:
                req.error = f"{type(exc).__name__}: {exc}"
                self.scheduler.finish(req, "error")
                failed.append(req)
        if any(x.is_deleted() for x in jax.tree.leaves(self.pools)):
            self.pools = jax.device_put(self._empty_pools(), jax.devices()[0] if self.mesh is None
                                        else self._pool_shardings())
            self.pool.forget_prefixes()
            for req in sorted(self.scheduler.running, key=lambda r: -r.rid):  # newest first: oldest ends up in front
                self.scheduler.preempt(req)
        return failed

    def _step(self, work: list[Work]) -> list[Request]:
        self.steps += 1
        t_start = time.perf_counter()
        for w in work:
            if w.request.started is None:
                w.request.started, w.request.compile_at_start = t_start, self.compile_seconds
        # A speculative row goes through prefill until it has a draft: a one-token prompt too (verifying the
        # draft it does not have would emit token 0).
        decode = [w for w in work if w.n == 1 and w.sample and not (self.speculative and w.request.draft_q is None)]
        prefill = [w for w in work if not any(w is d for d in decode)]
        # Prefill rows go in one call per length bucket (a 9-token tail is not padded to a 256-token chunk);
        # all calls are dispatched before any result is read.
        groups: dict[int, list[Work]] = {}
        for w in prefill:
            groups.setdefault(_bucket4(w.n), []).append(w)
        out_p = [(g, self._run_prefill(g)) for g in groups.values()]
        # Rows under a grammar decode one token per dispatch (the host advances the grammar between tokens).
        bound = [w for w in decode if w.request.constraint is not None]
        decode = [w for w in decode if w.request.constraint is None]
        out_d = self._run_decode(decode) if decode else None
        out_b = self._run_decode(bound, 1) if bound else None
        finished = []
        now = time.perf_counter()
        for group, (out, lps) in out_p:
            toks = np.asarray(out)
            lps = None if lps is None else jax.tree.map(np.asarray, lps)
            for i, w in enumerate(group):
                req = w.request
                if lps is not None and req.prompt_lps is not None:
                    self._note_prompt_logprobs(req, w, lps[1], i)
                req.computed += w.n
                self.scheduler.register_prefix(req)
                if w.sample and self._emit(req, [int(toks[i])], now, _row_logprobs(lps and lps[0], i)):
                    finished.append(req)
        for rows, out in (((decode, out_d), (bound, out_b)) if self.speculative else ()):
            if not rows:
                continue
            emitted, n_new, lps = out
            emitted, n_new = np.asarray(emitted), np.asarray(n_new)
            lps = None if lps is None else jax.tree.map(np.asarray, lps)
            for i, w in enumerate(rows):
                req = w.request
                for k in range(n_new.shape[1]):
                    if req.done:
                        break
                    req.drafted += 1
                    req.accepted += int(n_new[i, k]) - 1
                    req.computed += int(n_new[i, k])
                    got = None if lps is None else tuple(x[i, k] for x in lps)
                    self._emit(req, emitted[i, k, :n_new[i, k]].tolist(), now, _row_logprobs(got, slice(None)))
                if req.done:
                    finished.append(req)
        for rows, out, n in (() if self.speculative else ((decode, out_d, self.decode_steps), (bound, out_b, 1))):
            if not rows:
                continue
            toks, lps = out
            toks = np.asarray(toks)
            lps = None if lps is None else jax.tree.map(np.asarray, lps)
            for i, w in enumerate(rows):
                req = w.request
                req.computed += n
                if self._emit(req, toks[i].tolist(), now, _row_logprobs(lps, i)):
                    finished.append(req)
        return finished

    def _note_prompt_logprobs(self, req: Request, w: Work, lps, i: int) -> None:
        """Prompt tokens' log-probabilities from a prefill chunk: position p of the chunk predicts token p + 1."""
        lp, ids, vals = lps
        k = req.prompt_logprobs
        for t in range(w.n):
            j = w.start + t + 1
            if j < len(req.prompt) and req.prompt_lps[j] is None:
                req.prompt_lps[j] = (float(lp[i, t]), list(zip(ids[i, t, :k].tolist(), vals[i, t, :k].tolist())))

    def _emit(self, req: Request, new: list[int], now: float, lps: list | None = None) -> bool:
        """Append sampled tokens (up to a stop, the length limit or a stop string) and, when the request asked,
        their log-probabilities (`lps`, one (logprob, [(id, logprob)]) per token of `new`); True if req finished."""
        if req.done:
            return False
        take, reason = [], None
        for t in new:
            if t in req.stop_ids and len(req.output) + len(take) >= req.min_tokens:
                reason = "stop"
                break
            take.append(t)
            if len(req.output) + len(take) >= req.max_tokens:
                reason = "length"
                break
        if req.stop_strings and take:
            text = self.tokenizer.decode(req.output + take)
            early = req.min_tokens - len(req.output)  # tokens still too early for a stop string to end in
            floor = len(self.tokenizer.decode(req.output + take[:early])) if early > 0 else 0
            hits = [(h, s) for s in req.stop_strings
                    if (h := text.find(s, max(floor, len(req.text) - len(s)))) >= 0]
            if hits:
                cut, s = min(hits)
                end = cut + len(s) if req.include_stop_str else cut  # the text ends here
                # Keep the tokens up to the one the stop string starts in (or, included, ends in); it may be out
                # already. Tokens past it are dropped.
                while take and len(self.tokenizer.decode(req.output + take[:-1])) > end - req.include_stop_str:
                    take.pop()
                reason = "stop"
                text = self.tokenizer.decode(req.output + take)[:end]
            req.text = text
        if req.constraint is not None:
            for j, t in enumerate(take):
                if not req.constraint.advance(t):  # (cannot happen: the token was drawn from the allowed ones)
                    req.error, reason, take = f"the grammar refused token {t}", "error", take[:j]
                    break
                if req.constraint.done:  # complete: nothing may follow (a speculative second token is dropped)
                    reason, take = reason or "stop", take[:j + 1]
                    break
        req.output.extend(take)
        if req.logprobs is not None and lps is not None:
            req.token_logprobs.extend((lp, top[:req.logprobs]) for lp, top in lps[:len(take)])
        req.token_times.extend([now] * len(take))
        # The cache holds only what was fed: the last emitted token is pending, the rest are written.
        req.computed = min(req.computed, len(req.prompt) + len(req.output) - 1)
        if take and req.on_tokens is not None:
            req.on_tokens(req, take)
        if reason is not None:
            self.scheduler.finish(req, reason)
            req.seconds = time.perf_counter() - req.started - (self.compile_seconds - req.compile_at_start)
            return True
        return False

    def _tables(self, work: list[Work], rows: int, width: int | None = None) -> np.ndarray:
        """Page tables [rows, width] (default: table_width; unused entries: the trash page, hidden by the causal
        mask). Attention reads width x page_size slots per row."""
        M = width or self.table_width
        table = np.zeros((rows, M), np.int32)
        for i, w in enumerate(work):
            n = min(len(w.request.pages), M)
            table[i, :n] = w.request.pages[:n]
        return table

    def _sampling(self, work: list[Work], rows: int):
        seeds = np.zeros(rows, np.int32)
        index = np.zeros(rows, np.int32)
        temp = np.zeros(rows, np.float32)
        top_k = np.zeros(rows, np.int32)
        top_p = np.ones(rows, np.float32)
        min_p = np.zeros(rows, np.float32)
        for i, w in enumerate(work):
            s = w.request.sampling
            seeds[i], index[i] = s.seed, len(w.request.output)
            temp[i], top_k[i], top_p[i], min_p[i] = s.temperature, s.top_k, s.top_p, s.min_p
        return seeds, index, temp, top_k, top_p, min_p

    def _allowed(self, work: list[Work], rows: int, draft: bool = False):
        """Speculative steps' grammar masks (structured outputs), None when no row has a grammar: [rows, V] for the
        token a prefill samples; with `draft`, [rows, 2, V]: the mask now and the mask after the row's draft (the
        grammar advanced on a copy; a draft the grammar refuses leaves that mask open, as it cannot be accepted)."""
        if not any(w.request.constraint is not None for w in work):
            return None
        V = self.cfg.vocab_size
        out = np.ones((rows, 2, V) if draft else (rows, V), bool)
        for i, w in enumerate(work):
            g = w.request.constraint
            if g is None or not w.sample:
                continue
            now = g.allowed()
            if not draft:
                out[i] = now
                continue
            out[i, 0] = now
            if now[w.request.draft]:
                after = g.copy()
                if after.advance(w.request.draft) and not after.done:
                    out[i, 1] = after.allowed()
        (out,) = self._put(out)
        return out

    @staticmethod
    def _penalized(work: list[Work]) -> bool:
        return any(w.request.sampling.penalized or w.request.constraint is not None for w in work)

    def _penalties(self, work: list[Work], rows: int) -> dict | None:
        """The token-dependent transforms' arrays of a step (sampling.penalize), None when no row uses them (the
        usual case: no [rows, V] arrays built or sent). Counts are of each row's output so far; `seen` also
        covers its prompt; `allowed` is each constrained row's grammar mask for its next token."""
        if not self._penalized(work):
            return None
        V = self.cfg.vocab_size
        pen = {"bias": np.zeros((rows, V), np.float32), "seen": np.zeros((rows, V), bool),
               "counts": np.zeros((rows, V), np.int32), "presence": np.zeros(rows, np.float32),
               "frequency": np.zeros(rows, np.float32), "repetition": np.ones(rows, np.float32),
               "allowed": np.ones((rows, V), bool)}
        for i, w in enumerate(work):
            s, req = w.request.sampling, w.request
            if req.constraint is not None and w.sample:
                pen["allowed"][i] = req.constraint.allowed()
            if not s.penalized:
                continue
            for t, b in s.logit_bias:
                pen["bias"][i, t] += b
            pen["seen"][i, req.prompt] = True
            pen["seen"][i, req.output] = True
            np.add.at(pen["counts"][i], req.output, 1)
            pen["presence"][i], pen["frequency"][i] = s.presence_penalty, s.frequency_penalty
            pen["repetition"][i] = s.repetition_penalty
        return dict(zip(pen, self._put(*pen.values())))

    @_on_mesh
    def _run_prefill(self, work: list[Work]):
        B = self._rows(len(work))
        T = _bucket4(max(w.n for w in work))
        tokens = np.zeros((B, T), np.int32)
        positions = np.full((B, T), -1, np.int32)
        last = np.zeros(B, np.int32)
        targets = np.full((B, T), -1, np.int32)
        for i, w in enumerate(work):
            seq = w.request.sequence
            tokens[i, :w.n] = seq[w.start:w.start + w.n]
            positions[i, :w.n] = np.arange(w.start, w.start + w.n)
            last[i] = w.n - 1
            after = seq[w.start + 1:w.start + w.n + 1]
            targets[i, :len(after)] = after
        # Prefill attends over the pages its chunks reach, in widths of powers of 4 pages (few shapes): a
        # chunk early in a long request does not read the whole table.
        reach = max(self.scheduler.pages_needed(w.start + w.n) for w in work)
        width = 4
        while width < reach:
            width *= 4
        table = self._tables(work, B, min(width, self.table_width))
        t0 = time.perf_counter()
        K = self._logprobs_k(work)
        fresh = self._note_compile("prefill", B, T, table.shape[1], K, self._penalized(work))  # (spec: grammar)
        if self.speculative:
            next_known = np.full(B, -1, np.int32)
            for i, w in enumerate(work):
                seq = w.request.sequence
                if w.start + w.n < len(seq):
                    next_known[i] = seq[w.start + w.n]
            nxt, lps, draft, q, self.pools = steps.prefill_step_spec(
                self.graphdef, K, self.state, self.pools, *self._put(table, tokens, positions, last, targets,
                                                                      next_known, *self._sampling(work, B)),
                self._allowed(work, B))
            draft, q = np.asarray(draft), np.asarray(q)
            for i, w in enumerate(work):
                if w.sample:
                    w.request.draft, w.request.draft_q = int(draft[i]), q[i]
        else:
            nxt, lps, self.pools = steps.prefill_step(self.graphdef, K, self.state, self.pools,
                                                      *self._put(table, tokens, positions, last, targets,
                                                                 *self._sampling(work, B)), self._penalties(work, B))
        if fresh:
            jax.block_until_ready(nxt)
            self.compile_seconds += time.perf_counter() - t0
        return nxt, lps

    @staticmethod
    def _logprobs_k(work: list[Work]) -> int:
        """The static log-probability width of a step: MAX_LOGPROBS if any of its requests reports any, else 0."""
        wants = any(w.request.logprobs is not None or w.request.prompt_logprobs is not None for w in work)
        return MAX_LOGPROBS if wants else 0

    def _decode_width(self, reach: int) -> int:
        return min(_bucket(reach, 4), self.table_width)

    @_on_mesh
    def _run_decode(self, work: list[Work], n_steps: int | None = None):
        B = self._rows(len(work))
        n_steps = n_steps or self.decode_steps
        token = np.zeros(B, np.int32)
        position = np.zeros(B, np.int32)
        valid = np.zeros(B, bool)
        for i, w in enumerate(work):
            token[i], position[i], valid[i] = w.request.sequence[w.start], w.start, True
        # Decode attends over the pages its steps reach, in power-of-two widths: short requests batched
        # together do not read (or, with the jnp read, gather) the longest request's table.
        reach = max(self.scheduler.pages_needed(w.start + self.scheduler.lookahead) for w in work)
        table = self._tables(work, B, self._decode_width(reach))
        t0 = time.perf_counter()
        K = self._logprobs_k(work)
        fresh = self._note_compile("decode", B, table.shape[1], K, self._penalized(work), n_steps)  # (spec: grammar)
        if self.speculative:
            draft = np.zeros(B, np.int32)
            q = np.zeros((B, self.cfg.vocab_size), np.float32)
            for i, w in enumerate(work):
                draft[i] = w.request.draft
                if w.request.draft_q is not None:
                    q[i] = w.request.draft_q
            emitted, n_new, lps, draft, q, self.pools = steps.verify_step(
                self.decode_graphdef, n_steps, K, self.state, self.pools,
                *self._put(table, token, draft, q, position, valid, *self._sampling(work, B)),
                self._allowed(work, B, draft=True))
            draft, q = np.asarray(draft), np.asarray(q)
            for i, w in enumerate(work):
                w.request.draft, w.request.draft_q = int(draft[i]), q[i]
            out = (emitted, n_new, lps)
        else:
            toks, lps, self.pools = steps.decode_step(self.decode_graphdef, n_steps, K, self.state,
                                                      self.pools, *self._put(table, token, position, valid,
                                                                             *self._sampling(work, B)),
                                                      self._penalties(work, B))
            out = (toks, lps)
        if fresh:
            jax.block_until_ready(out)
            self.compile_seconds += time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ convenience
    def warmup(self) -> int:
        """Compile (by running once on the trash page) every step shape this engine can schedule: prefill rows x
        lengths {16, 64, 256, ...} x attention widths (rows x length at most 8x the token budget: a length pads a
        chunk at most 4x and a row count a group at most 2x), and decode rows x attention widths.
        Servers call it at start-up so no request waits for a compilation. Returns the shapes compiled."""
        before = self.compilations
        G = self.page_size
        rows = [b for b in (2**i for i in range(12)) if b <= self._rows(self.max_batch)]
        lengths = [t for t in (16 * 4**i for i in range(8)) if t <= _bucket4(self.scheduler.max_prefill_chunk)]
        widths = [w for w in (4**i for i in range(1, 12)) if w < self.table_width] + [self.table_width]

        def dummy(start, n):
            req = Request(-1, [0] * (start + n), 1)
            return Work(req, start, n)

        budget = max(self.scheduler.max_batch_tokens, 16)
        for T in lengths:
            for B in rows:
                if B * T > 8 * budget:
                    continue
                for W in widths:
                    start = max(0, min(W * G, self.max_seq_len) - T)
                    out = self._run_prefill([dummy(start, T) for _ in range(min(B, self.max_batch))])
        decode_widths = sorted({self._decode_width(2**i) for i in range(2, 13)})
        for B in rows:
            for W in decode_widths:
                start = max(0, min(W * G, self.max_seq_len) - self.scheduler.lookahead)
                out = self._run_decode([dummy(start, 1) for _ in range(min(B, self.max_batch))])
        jax.block_until_ready(out)
        return self.compilations - before

    def run(self) -> None:
        while not self.idle:
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), *, speculative: bool | None = None,
                 stop_tokens: Sequence[int] = (EOS_ID,),
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> list[Completion]:
        """Static batching on the engine: every prompt submitted at once (a bad one raises UserError naming it, and
        none is queued), run to completion. Stops a row at its first stop token (not included in the output);
        `on_tokens(row, new_ids)` streams. Returns one Completion per prompt, in order (`seconds`: wall time of
        the call less the time spent compiling in it)."""
        if speculative is not None and bool(speculative) != self.speculative:
            raise UserError(f"this engine was built with speculative={self.speculative}; build one with "
                            f"Engine(..., speculative={bool(speculative)})")
        if not prompts:
            raise UserError("no prompts given")
        t0, c0 = time.perf_counter(), self.compile_seconds
        ids = []
        for i, p in enumerate(prompts):
            cb = None if on_tokens is None else (lambda req, new, i=i: on_tokens(i, new))
            try:
                ids.append(self.submit(p, max_new_tokens, sampling, stop_ids=stop_tokens, on_tokens=cb))
            except UserError as e:
                for rid in ids:  # nothing of this call stays queued
                    self.cancel(rid)
                    del self.requests[rid]
                raise UserError(f"prompt {i}: {e}", field=e.field) from None
        self.run()
        seconds = time.perf_counter() - t0 - (self.compile_seconds - c0)
        out = [Completion(tokens=list(r.output), prompt_len=len(r.prompt), finish_reason=r.finish_reason,
                          seconds=seconds, drafted=r.drafted, accepted=r.accepted) for r in map(self.result, ids)]
        for rid in ids:
            self.release(rid)
        return out
