"""Batched generation over the absorbed-MLA latent cache, with optional MTP speculative decoding.

Shape legend: B batch rows (prompts, padded to a multiple of the mesh's batch shards), Tp padded prompt
length, S cache capacity, V vocabulary, D model width.

Layout: RIGHT padding with per-row lengths. Row b's prompt sits in slots [0, len_b) at its natural
positions 0..len_b-1, so its RoPE phases, and therefore its tokens, are exactly those of the prompt
decoded alone; the pad slots after it are masked (attention reads slot s only if s <= the query's
position) and overwritten as the row grows. Each row writes its next token at its own slot len_b.

Plain decoding, per step (one compiled function for all steps):
    pending token t (emitted, not yet cached) at position len  ->  decode([t], [len])  ->  next token
    len += 1 for every row still generating.

MTP speculative decoding (REFERENCE.md section 4). The first MTP module reads (h_i, Emb(t_{i+1})), h the
main model's final-normed hidden state, and predicts t_{i+2}; it keeps its own latent cache. Per step:
    1. verify: decode([pending, draft], positions [len, len+1]) -> logits for t_{len+1}, t_{len+2}
    2. a1 = choice at len (greedy: argmax; sampling: accept the draft with prob min(1, p(d)/q(d)), else
       draw from norm(max(p - q, 0))); accepted iff a1 == draft. a2 = choice at len+1.
    3. commit: emit [a1] or, if accepted, [a1, a2]; len += 1 + accepted. A rejected draft's slot len+1
       is simply not counted: with a positional cache, rollback = not advancing the length.
    4. draft: MTP on positions [len, len+1] with inputs (h_len, a1), (h_len+1, a2) - in both cases the
       token after position len is a1 - and the next draft is read at position len + accepted.
Greedy speculative output equals plain greedy output token for token (tests/test_infer.py); with
sampling, the accept/resample rule keeps the main model's distribution (speculative sampling).

Errors a user can cause (empty prompt, prompt longer than the cache or the context, max_new_tokens
that overflow the cache) raise ValueError before anything is compiled.

Sharding: with a mesh, parameters are placed by `dsv3_jax.sharding.state_shardings` (the logical-axis
rules table) and the cache by the logical names of `ModelCache.logical_axes` through the same table
(batch -> the data-parallel mesh axes, layers -> stage, cache_length and latent replicated); XLA's SPMD
partitioner does the rest. The batch is padded with inactive one-token rows to a multiple of the batch
shards. Compiled steps are cached per input shapes; `compile_seconds` counts time spent compiling,
which is excluded from the reported tokens/s.

Dtypes: the cache is stored in `cache_dtype` (default: the model's compute dtype; bfloat16 halves it);
logits, sampling distributions and acceptance tests are float32.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dsv3_jax import sharding
from dsv3_jax.cli import UserError
from dsv3_jax.infer.sampling import (
    SamplingParams,
    greedy,
    probabilities,
    sample,
    verify_draft,
)
from dsv3_jax.model import DeepSeekV3, ModelCache, with_runtime

EOS_ID = 1  # DeepSeek-V3 <|end_of_text|> (and the demo tokenizer's)


@dataclasses.dataclass
class Completion:
    """One prompt's result. `seconds` is the wall time of its batch (prefill + decode, no compilation)."""

    tokens: list[int]
    prompt_len: int
    finish_reason: str  # "stop" (a stop token, not included in `tokens`) or "length"
    seconds: float
    drafted: int = 0  # speculative verify steps for this row
    accepted: int = 0  # drafts the main model accepted

    @property
    def tokens_per_sec(self) -> float:
        return len(self.tokens) / max(self.seconds, 1e-9)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def cache_bytes_per_token(cache: ModelCache) -> dict:
    """Bytes each token occupies in the cache: {'main': all main-model layers, 'mtp': the MTP layer}."""

    def per_token(c):
        if c is None:
            return 0
        return sum(a.dtype.itemsize * a.size // (a.shape[-2] * a.shape[-3]) for a in (c.c_kv, c.k_pe))

    return {"main": per_token(cache.dense) + per_token(cache.moe), "mtp": per_token(cache.mtp)}


def mha_cache_bytes_per_token(cfg, itemsize: int) -> int:
    """A plain multi-head K/V cache of the same model: N (dn + dr) keys + N dv values per token per layer."""
    per_layer = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return per_layer * cfg.num_hidden_layers * itemsize


class Generator:
    """Prefill + cached decode for one model, cache capacity and (optional) mesh.

    model: a DeepSeekV3; capacity: cache slots per row (prompt + new tokens must fit; at most the model's
    context); cache_dtype: dtype of the cached latent (default: the compute dtype); mesh: a Mesh with
    axes from `sharding.MESH_AXES` on which parameters and cache are placed (XLA partitions the steps;
    the model's own Runtime runs without a mesh here); decode_moe_impl: expert layout in decode steps
    (default: the Runtime's `decode_expert_impl`, 'dense' on CPU, where computing every expert for a
    handful of tokens beats sorting them into blocks); prefill_bucket: prompts are padded to a multiple
    of this many tokens so that few prefill shapes compile.
    """

    def __init__(self, model: DeepSeekV3, *, capacity: int | None = None, cache_dtype=None, mesh: Mesh | None = None,
                 decode_moe_impl: str | None = None, prefill_bucket: int = 32):
        cfg = model.cfg
        self.cfg = cfg
        context = cfg.max_position_embeddings
        self.capacity = min(context, 4096) if capacity is None else int(capacity)
        if not 0 < self.capacity <= context:
            raise UserError(f"cache capacity {self.capacity} must be in [1, max_position_embeddings={context}]")
        self.cache_dtype = jnp.dtype(cfg.compute_dtype if cache_dtype is None else cache_dtype)
        self.mesh = mesh
        self.prefill_bucket = prefill_bucket
        self.runtime = model.runtime.replace(mesh=None)  # prefill; arrays are placed on `mesh` below
        decode = self.runtime.for_decode()
        if decode_moe_impl is not None:
            decode = decode.replace(expert_impl=decode_moe_impl)
        self.decode_runtime = decode
        self.decode_moe_impl = decode.expert_impl
        self.has_mtp = len(model.mtp) > 0
        graphdef, state = nnx.split(with_runtime(model, self.runtime))
        self.decode_graphdef = nnx.split(with_runtime(model, decode))[0]
        self.batch_multiple = 1
        if mesh is not None:
            state = jax.device_put(state, sharding.state_shardings(state, mesh))
            self.batch_multiple = int(np.prod([mesh.shape[a] for a in _axes(sharding.logical_to_spec(("batch",))[0])]))
        self.graphdef, self.state = graphdef, state
        self.compile_seconds = 0.0
        self._executables: dict = {}
        # With a mesh, every output's placement is pinned (cache: logical shardings; tokens, lengths and
        # draft distributions: replicated), so each compiled step receives what it was compiled for.
        rep = None if mesh is None else NamedSharding(mesh, jax.sharding.PartitionSpec())
        cache = {spec: self.cache_shardings(spec) for spec in (False, True)}
        self._jitted = {
            "init_plain": jax.jit(self._init_cache_fn(False), out_shardings=cache[False]),
            "init_spec": jax.jit(self._init_cache_fn(True), out_shardings=cache[True]),
            "prefill_plain": jax.jit(self._prefill_fn(False), donate_argnums=(1,), out_shardings=(rep, cache[False])),
            "prefill_spec": jax.jit(self._prefill_fn(True), donate_argnums=(1,),
                                    out_shardings=(rep, rep, rep, cache[True])),
            "step_plain": jax.jit(self._step_fn, donate_argnums=(1,), out_shardings=(rep, rep, cache[False])),
            "step_spec": jax.jit(self._spec_step_fn, donate_argnums=(1,), out_shardings=(rep,) * 6 + (cache[True],)),
        }
        self._replicated = rep

    # ------------------------------------------------------------------ compiled functions
    def _model(self, state, decode: bool = False) -> DeepSeekV3:
        return nnx.merge(self.decode_graphdef if decode else self.graphdef, state)

    def cache_shardings(self, spec: bool):
        """NamedShardings of the cache from its logical axis names and the rules table (None: no mesh)."""
        if self.mesh is None or (spec and not self.has_mtp):
            return None
        abstract = nnx.eval_shape(lambda: self._model(self.state).init_cache(1, 1, self.cache_dtype, mtp=spec))
        return jax.tree.map(lambda n: NamedSharding(self.mesh, sharding.logical_to_spec(n)),
                            ModelCache.logical_axes(abstract), is_leaf=lambda x: isinstance(x, tuple))

    def _put(self, x):
        """A host value as a device array, replicated over the mesh if there is one."""
        return jnp.asarray(x) if self.mesh is None else jax.device_put(x, self._replicated)

    def _init_cache_fn(self, spec: bool):
        def init(state, batch_like):
            return self._model(state).init_cache(batch_like.shape[0], self.capacity, self.cache_dtype, mtp=spec)

        return init

    def _prefill_fn(self, spec: bool):
        def prefill(state, cache, tokens, lengths, key, temperature, top_k, top_p):
            model = self._model(state)
            logits, h, cache = model.prefill(tokens, cache)
            rows, last = jnp.arange(tokens.shape[0]), lengths - 1
            first = sample(jax.random.fold_in(key, 0), logits[rows, last], temperature, top_k, top_p)
            if not spec:
                return first, cache
            ext = jnp.concatenate([tokens, jnp.zeros_like(tokens[:, :1])], axis=1).at[rows, lengths].set(first)
            mtp_logits, cache = model.mtp_prefill(h, ext[:, 1:], cache)
            draft, q = _draft(jax.random.fold_in(key, 1), mtp_logits[rows, last], temperature, top_k, top_p)
            return first, draft, q, cache

        return prefill

    def _step_fn(self, state, cache, pending, lengths, active, key, step, temperature, top_k, top_p):
        model = self._model(state, decode=True)
        key = jax.random.fold_in(key, step)
        logits, _, cache = model.decode(pending[:, None], lengths[:, None], cache)
        nxt = sample(key, logits[:, 0], temperature, top_k, top_p)
        return nxt, lengths + active.astype(lengths.dtype), cache

    def _spec_step_fn(self, state, cache, pending, draft, q, lengths, active, key, step, temperature, top_k, top_p):
        model = self._model(state, decode=True)
        B = pending.shape[0]
        rows = jnp.arange(B)
        positions = lengths[:, None] + jnp.arange(2)  # [B, 2]
        logits, h, cache = model.decode(jnp.stack([pending, draft], 1), positions, cache)
        k_verify, k_next, k_draft = jax.random.split(jax.random.fold_in(key, step), 3)

        def greedy_verify():  # accept iff the draft is the argmax; a2 = the argmax after it
            a1 = greedy(logits[:, 0])
            return draft == a1, a1, greedy(logits[:, 1])

        def sampled_verify():  # speculative sampling keeps the main model's distribution
            p1 = probabilities(logits[:, 0], temperature, top_k, top_p)
            accept, a1 = verify_draft(k_verify, p1, q, draft)
            return accept, a1, sample(k_next, logits[:, 1], temperature, top_k, top_p)

        accept, a1, a2 = jax.lax.cond(temperature > 0, sampled_verify, greedy_verify)
        # the next draft: MTP at positions len (input a1) and len+1 (input a2), read where the row now ends
        mtp_logits, cache = model.mtp_decode(h, jnp.stack([a1, a2], 1), positions, cache)
        new_draft, new_q = _draft(k_draft, mtp_logits[rows, accept.astype(jnp.int32)], temperature, top_k, top_p)
        n_new = 1 + accept.astype(lengths.dtype)
        emitted = jnp.stack([a1, a2], 1)
        pending = jnp.where(accept, a2, a1)
        lengths = lengths + jnp.where(active, n_new, 0)
        return emitted, n_new, pending, new_draft, new_q, lengths, cache

    def _run(self, name: str, *args):
        """Call a compiled function, compiling it ahead of time (and timing that) on first use of a shape."""
        leaves, treedef = jax.tree.flatten(args)
        key = (name, treedef, tuple((x.shape, x.dtype) for x in leaves))
        exe = self._executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = self._jitted[name].lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
            self._executables[key] = exe
        return exe(*args)

    # ------------------------------------------------------------------ generation
    def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        """Raise ValueError for anything that cannot run: empty or too long prompts, cache overflow."""
        cfg = self.cfg
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if not prompts:
            raise UserError("no prompts given")
        for i, p in enumerate(prompts):
            n = len(p)
            if n == 0:
                raise UserError(f"prompt {i} is empty: it needs at least one token")
            if n > cfg.max_position_embeddings:
                raise UserError(f"prompt {i} has {n} tokens, more than the model's context of "
                                f"{cfg.max_position_embeddings} (max_position_embeddings); shorten it")
            if n > self.capacity:
                raise UserError(f"prompt {i} has {n} tokens, more than the cache's capacity of {self.capacity} "
                                f"tokens; shorten it or raise the cache length")
            if n + max_new_tokens > self.capacity:
                fix = ("shorten the prompt or lower max_new_tokens: the cache already spans the model's context"
                       if self.capacity == cfg.max_position_embeddings else
                       f"lower max_new_tokens or raise the cache capacity (infer.py --cache_len, at most "
                       f"max_position_embeddings={cfg.max_position_embeddings})")
                raise UserError(f"prompt {i} ({n} tokens) + max_new_tokens ({max_new_tokens}) = "
                                f"{n + max_new_tokens} exceeds the cache's capacity of {self.capacity} tokens; {fix}")
            if max(p) >= cfg.vocab_size or min(p) < 0:
                raise UserError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), *, speculative: bool = False,
                 stop_tokens: Sequence[int] = (EOS_ID,),
                 on_tokens: Callable[[int, list[int]], None] | None = None) -> list[Completion]:
        """Generate up to `max_new_tokens` for each prompt (lists of token ids), all rows in one batch.

        Stops a row at its first stop token (not included in the output). `on_tokens(row, new_ids)` is called
        as tokens are committed (streaming). Returns one Completion per prompt, in order.
        """
        self.check_prompts(prompts, max_new_tokens)
        if speculative and not self.has_mtp:
            raise UserError("speculative decoding needs an MTP module (num_nextn_predict_layers >= 1)")
        n = len(prompts)
        B = round_up(n, self.batch_multiple)
        lens = [len(p) for p in prompts] + [1] * (B - n)  # padding rows: one token, never active
        Tp = min(self.capacity, round_up(max(lens), self.prefill_bucket))
        tokens = np.zeros((B, Tp), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        lengths = self._put(np.asarray(lens, np.int32))
        active_np = np.arange(B) < n
        stops = set(int(t) for t in stop_tokens)
        params = tuple(self._put(a) for a in sampling.arrays())
        key = self._put(jax.random.PRNGKey(sampling.seed))
        suffix = "spec" if speculative else "plain"

        out: list[list[int]] = [[] for _ in range(n)]
        reason = ["length"] * n
        drafted, accepted = [0] * n, [0] * n

        def commit(i, new):
            """Append row i's new tokens, honouring stop tokens and max_new_tokens; False when the row is done."""
            take = []
            for t in new:
                if t in stops:
                    reason[i] = "stop"
                    break
                take.append(int(t))
                if len(out[i]) + len(take) >= max_new_tokens:
                    break
            out[i].extend(take)
            if take and on_tokens is not None:
                on_tokens(i, take)
            return reason[i] != "stop" and len(out[i]) < max_new_tokens

        cache = self._run("init_" + suffix, self.state, self._put(np.zeros((B,), np.int32)))
        jax.block_until_ready(cache)
        # compile before the clock starts
        self._warm(suffix, cache, tokens, lengths, key, params, B)
        t0 = time.perf_counter()
        res = self._run("prefill_" + suffix, self.state, cache, self._put(tokens), lengths, key, *params)
        if speculative:
            pending, draft, q, cache = res
        else:
            pending, cache = res
        for i, t in enumerate(np.asarray(pending)[:n]):
            active_np[i] = commit(i, [int(t)])
        step = 1
        while active_np.any():
            step_no = self._put(np.int32(step + 1))
            active = self._put(active_np)
            if speculative:
                emitted, n_new, pending, draft, q, lengths, cache = self._run(
                    "step_spec", self.state, cache, pending, draft, q, lengths, active, key, step_no, *params)
                emitted, n_new = np.asarray(emitted), np.asarray(n_new)
                for i in np.flatnonzero(active_np):
                    drafted[i] += 1
                    accepted[i] += int(n_new[i]) - 1
                    active_np[i] = commit(i, emitted[i, :n_new[i]].tolist())
            else:
                pending, lengths, cache = self._run("step_plain", self.state, cache, pending, lengths, active,
                                                    key, step_no, *params)
                nxt = np.asarray(pending)
                for i in np.flatnonzero(active_np):
                    active_np[i] = commit(i, [int(nxt[i])])
            step += 1
        seconds = time.perf_counter() - t0
        return [Completion(tokens=out[i], prompt_len=len(prompts[i]), finish_reason=reason[i], seconds=seconds,
                           drafted=drafted[i], accepted=accepted[i]) for i in range(n)]

    def _warm(self, suffix, cache, tokens, lengths, key, params, B):
        """Compile the prefill and step functions for these shapes (not run), so timing excludes compiling."""
        sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))  # noqa: E731
        for name, args in self._signatures(suffix, cache, tokens, lengths, key, params, B):
            leaves, treedef = jax.tree.flatten(args)
            k = (name, treedef, tuple((x.shape, x.dtype) for x in leaves))
            if k not in self._executables:
                t0 = time.perf_counter()
                self._executables[k] = self._jitted[name].lower(*jax.tree.map(sds, args)).compile()
                self.compile_seconds += time.perf_counter() - t0

    def _signatures(self, suffix, cache, tokens, lengths, key, params, B):
        yield "prefill_" + suffix, (self.state, cache, self._put(tokens), lengths, key, *params)
        active, step = self._put(np.ones((B,), bool)), self._put(np.int32(0))
        if suffix == "plain":
            yield "step_plain", (self.state, cache, lengths, lengths, active, key, step, *params)
        else:
            q = self._put(np.zeros((B, self.cfg.vocab_size), np.float32))
            yield "step_spec", (self.state, cache, lengths, lengths, q, lengths, active, key, step, *params)


def _draft(key, logits, temperature, top_k, top_p):
    """Draft token [B] and its proposal distribution q [B, V] (zeros when greedy) from MTP logits [B, V]."""

    def sampled():
        q = probabilities(logits, temperature, top_k, top_p)
        return jax.random.categorical(key, jnp.log(q), axis=-1).astype(jnp.int32), q

    return jax.lax.cond(temperature > 0, sampled, lambda: (greedy(logits), jnp.zeros_like(logits, jnp.float32)))


def _axes(entry) -> tuple:
    if entry is None:
        return ()
    return entry if isinstance(entry, tuple) else (entry,)
