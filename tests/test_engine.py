"""The serving engine (dsv3_jax/infer/engine.py), the one decoder, against the full forward: greedy tokens by
repeated full forwards over each prompt alone (tests/reference/decoding.py); and its parts against plain
references: the paged cache against a dense per-row cache, the page pool's counts, the scheduler under memory
pressure.

The model is test_infer's small random DeepSeek-V3 (1 dense + 2 MoE layers, std 0.2: tokens are sensitive
to any wrong number). Greedy tokens must be equal, request by request, to the reference's for that prompt alone.

Compiled once, shared: the engine's steps are module-level jitted functions of the model's structure and the
step's shapes, so every single-device engine here has one configuration (`engine()`: one pool of POOL pages,
one page size, one max_seq_len, so one set of shapes) and the tests reuse each other's compilations; the
speculative, mesh and kernel engines add their own. The pool is small on purpose: requests get preempted.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_infer import draftable_model

from dsv3_jax import sharding
from dsv3_jax.cli import UserError
from dsv3_jax.infer.engine import Engine
from dsv3_jax.infer.paged_cache import PagedLatentCache, PagePool, PoolExhausted, page_keys
from dsv3_jax.infer.sampling import SamplingParams
from dsv3_jax.mla import LatentCache

from reference import decoding, tiny_config

NEW = 12
PROMPTS = [[3, 5, 7, 11, 2], [9, 2, 4, 4, 8, 10, 11, 30, 31, 17, 6], [20], list(range(2, 40)),
           [3, 5, 7, 11, 2, 8, 8, 9, 1, 4, 6, 12, 13, 14, 15, 16, 17, 18, 19, 21], [41, 42, 43, 44, 45, 46]]
GREEDY = SamplingParams()
POOL = 16  # pages of 4 tokens (15 usable): the longest request fits, two long ones do not


@pytest.fixture(scope="module")
def model():
    return draftable_model()


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt's greedy tokens alone, by repeated full forwards (the reference)."""
    return decoding.greedy(model, PROMPTS, NEW)


def engine(model, **kw):
    args = dict(page_size=4, max_batch=4, max_batch_tokens=24, max_prefill_chunk=16, pages=POOL, decode_steps=3,
                cache_dtype=jnp.float32, max_seq_len=56)
    return Engine(model, **(args | kw))


def test_paged_cache_reads_what_a_dense_cache_holds():
    cfg = tiny_config()
    rng = np.random.default_rng(0)
    B, G, M, R, dr = 3, 4, 5, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    dense = LatentCache.zeros(cfg, B, M * G, jnp.float32)
    paged = PagedLatentCache.zeros(cfg, 1 + B * M, G, jnp.float32)
    table = 1 + rng.permutation(B * M).reshape(B, M).astype(np.int32)  # scattered pages, none is the trash page
    paged = paged.with_table(jnp.asarray(table))
    for start, T in ((0, 7), (7, 1), (8, 5)):
        pos = jnp.broadcast_to(jnp.arange(start, start + T), (B, T))
        pos = pos.at[1, -1].set(-1)  # a padding token: written to the trash page, read by nobody
        c, k = jnp.asarray(rng.normal(size=(B, T, R))), jnp.asarray(rng.normal(size=(B, T, dr)))
        dense = dense.write(jnp.where(pos >= 0, pos, M * G), c, k)  # slot M*G: dropped
        paged = paged.write(pos, c, k)
    for a, b in zip(paged.layer(), dense.layer()):
        np.testing.assert_array_equal(np.asarray(a)[:, :13], np.asarray(b)[:, :13])
    assert paged.capacity == M * G


def test_page_pool_counts_shares_and_evicts():
    pool = PagePool(6, page_size=2)  # 5 usable pages
    a = pool.allocate(3)
    assert 0 not in a and pool.available == 2
    keys = page_keys([1, 2, 3, 4, 5, 6], 2)
    for k, p in zip(keys, a):
        pool.register(k, p)
    pool.release(a)  # registered: cached, still findable
    assert pool.available == 5 and pool.used == 0
    assert pool.lookup(page_keys([1, 2, 3, 4, 9, 9], 2)) == a[:2] and pool.hits == 2
    pool.release(a[:2])
    got = pool.allocate(4)  # 2 free + 2 evicted, least recently released first: a[2], then a[0]
    assert a[2] in got and a[0] in got and a[1] not in got and pool.available == 1
    assert pool.lookup(keys) == []  # the chain breaks at its first page (evicted)
    with pytest.raises(PoolExhausted):
        pool.allocate(2)


def test_greedy_equals_each_prompt_alone_with_staggered_arrivals(model, alone):
    eng = engine(model)
    ids = [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS[:3]]
    for _ in range(3):
        eng.step()
    ids += [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS[3:]]
    eng.run()
    for rid, want in zip(ids, alone):
        req = eng.result(rid)
        assert req.output == want and req.finish_reason == "length"
    assert eng.pool.used == 0  # every page came back (prefix pages stay cached, not used)


def test_greedy_survives_preemption_and_reuses_prefixes(model, alone):
    """A pool so small that requests are preempted and recomputed; the shared prefix of PROMPTS[0] and [4]
    is found in the prefix table."""
    eng = engine(model)
    ids = [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS]
    eng.run()
    assert eng.scheduler.preemptions > 0
    for rid, want in zip(ids, alone):
        assert eng.result(rid).output == want
    again = engine(model)
    first = again.submit(PROMPTS[4], NEW, stop_ids=())
    again.run()
    second = again.submit(PROMPTS[4], NEW, stop_ids=())
    again.run()
    assert again.result(second).prefix_hit_tokens == 16 and again.result(second).output == alone[4]
    assert again.result(first).prefix_hit_tokens == 0


def test_sampling_is_per_request_and_independent_of_the_batch(model):
    s = SamplingParams(temperature=1.0, top_k=8, seed=7)
    eng = engine(model)
    solo = eng.submit(PROMPTS[1], NEW, s, stop_ids=())
    eng.run()
    eng2 = engine(model)
    others = [eng2.submit(p, NEW, SamplingParams(temperature=0.7, seed=i), stop_ids=()) for i, p in enumerate(PROMPTS)]
    mixed = eng2.submit(PROMPTS[1], NEW, s, stop_ids=())
    eng2.run()
    assert eng.result(solo).output == eng2.result(mixed).output
    assert len({tuple(eng2.result(r).output) for r in others}) > 1


def test_stop_ids_max_tokens_cancel_and_bad_requests(model, alone):
    eng = engine(model)
    stop = alone[1][5]
    a = eng.submit(PROMPTS[1], NEW, stop_ids=(stop,))
    b = eng.submit(PROMPTS[0], 3, stop_ids=())
    c = eng.submit(PROMPTS[3], NEW, stop_ids=())
    eng.step()
    eng.cancel(c)
    eng.run()
    ra = eng.result(a)
    assert ra.finish_reason == "stop" and ra.output == alone[1][:alone[1].index(stop)]
    assert eng.result(b).output == alone[0][:3] and eng.result(b).finish_reason == "length"
    assert eng.result(c).finish_reason == "cancelled" and eng.pool.used == 0
    with pytest.raises(UserError, match="empty"):
        eng.submit([], 4)
    with pytest.raises(UserError, match="cache pages"):
        engine(model, pages=4).submit(PROMPTS[3], NEW)
    with pytest.raises(UserError, match="outside"):
        eng.submit([10**6], 4)


def test_bad_requests_fail_clearly_before_compiling(model):
    """Too long for the engine's max_seq_len or for the model's context, a max_seq_len past the context, an empty
    prompt: a UserError that names the limit, before anything compiles; `generate` leaves none of its prompts
    queued when one of them is bad."""
    eng = engine(model, max_seq_len=16)
    with pytest.raises(UserError, match=r"prompt \(17 tokens\) \+ max_tokens \(1\) = 18 exceeds the engine's max_seq"):
        eng.generate([[2] * 17], 1)
    with pytest.raises(UserError, match=r"prompt 1: .*\(8\) = 18 exceeds the engine's max_seq_len of 16") as e:
        eng.generate([[2] * 3, [2] * 10], 8)
    assert e.value.field == "max_tokens" and eng.idle and not eng.requests
    context = model.cfg.max_position_embeddings
    with pytest.raises(UserError, match=f"exceeds the model's context of {context}"):
        engine(model, max_seq_len=None).generate([[2] * (context + 1)], 1)
    with pytest.raises(UserError, match="max_position_embeddings"):
        engine(model, max_seq_len=context + 1)
    with pytest.raises(UserError, match="empty"):
        eng.generate([[]], 1)
    assert eng.compilations == 0 and eng.compile_seconds == 0.0


def test_generate_a_static_batch(model, alone):
    """`Engine.generate` (every prompt at once, run to completion) gives each prompt's reference tokens; a stop
    token ends a row before it (excluded, reason 'stop'), max_new_tokens cuts every row (reason 'length')."""
    eng = engine(model)
    got = eng.generate(PROMPTS, NEW, stop_tokens=())
    assert [c.tokens for c in got] == alone and {c.finish_reason for c in got} == {"length"}
    stop = alone[1][7]
    cut = eng.generate(PROMPTS, NEW, stop_tokens=(stop,))
    for c, want in zip(cut, alone):
        n = want.index(stop) if stop in want else NEW
        assert c.tokens == want[:n] and c.finish_reason == ("stop" if n < NEW else "length")
    assert cut[1].finish_reason == "stop" and len(cut[1].tokens) <= 7
    short = eng.generate(PROMPTS, 4, stop_tokens=())
    assert [c.tokens for c in short] == [a[:4] for a in alone] and {c.finish_reason for c in short} == {"length"}


def test_generate_sampling_is_seeded_and_top_k_1_is_greedy(model, alone):
    """Seeded sampling repeats itself and changes with the seed, plain and speculative (the accept/resample
    rule); top-k = 1 leaves one token, so sampling is greedy, also through the speculative rule."""
    plain, spec = engine(model), engine(model, speculative=True)

    def run(eng, s):
        return [c.tokens for c in eng.generate(PROMPTS, NEW, s, stop_tokens=())]

    hot = SamplingParams(temperature=1.5, seed=0)
    a, b, c = run(plain, hot), run(plain, hot), run(plain, SamplingParams(temperature=1.5, seed=1))
    assert a == b and a != c and a != alone
    nucleus = SamplingParams(temperature=1.5, top_p=0.9, seed=3)
    s1, s2 = run(spec, nucleus), run(spec, nucleus)
    assert s1 == s2 and s1 != alone
    k1 = SamplingParams(temperature=1.0, top_k=1, seed=7)
    assert run(plain, k1) == alone and run(spec, k1) == alone


def test_compilations_are_bounded(model):
    eng = engine(model)
    warmed = eng.warmup()
    assert warmed == eng.compilations > 0
    rng = np.random.default_rng(1)
    ids = [eng.submit(rng.integers(2, 48, int(n)).tolist(), int(m), stop_ids=())
           for n, m in zip(rng.integers(1, 40, 24), rng.integers(1, 16, 24))]
    eng.run()
    assert all(eng.result(i).done for i in ids)
    assert eng.compilations == warmed, eng._compiled  # the warm-up compiled every shape the workload used
    assert eng.pool.used == 0


def test_mtp_speculation_in_the_engine_keeps_greedy_output(model, alone):
    """Verify two tokens per step on the paged cache (main and MTP pools), rollback by length: the greedy
    tokens are plain greedy's (the reference's), token for token; drafts are both accepted and rejected, every
    row was drafted for, and there were fewer verify steps than tokens (each accepted draft saved one); with a
    tiny pool it also survives preemption, and a repeated prompt hits the prefix table (keys include the token
    after each page)."""
    eng = engine(model, speculative=True)
    ids = [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS]
    eng.run()
    for rid, want in zip(ids, alone):
        assert eng.result(rid).output == want
    drafted = sum(eng.result(i).drafted for i in ids)
    accepted = sum(eng.result(i).accepted for i in ids)
    assert 0 < accepted < drafted, (accepted, drafted)
    assert all(eng.result(i).drafted > 0 for i in ids)
    assert sum(len(eng.result(i).output) for i in ids) > drafted
    again = engine(model, speculative=True)  # a fresh pool: nothing evicts the first run's pages
    for _ in range(2):
        rid = again.submit(PROMPTS[3], NEW, stop_ids=())
        again.run()
    assert again.result(rid).output == alone[3] and again.result(rid).prefix_hit_tokens > 0


def test_engine_on_a_mesh_equals_one_device(model, alone):
    """Parameters placed by the logical-axis rules (experts over 'expert', heads over 'tensor'), the page pools
    by layer (over 'stage', else replicated), each step's rows over data x expert, on 8 fake CPU devices:
    the reference's greedy tokens."""
    mesh = sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2}, jax.devices()[:8])
    eng = engine(model, mesh=mesh, pages=64)  # its own compilations anyway; a pool that needs no preemption
    w = eng.state["moe_layers"]["ffn"]["w_gate"][...]
    assert w.sharding.spec == sharding.logical_to_spec(("layers", "experts", "embed", "expert_mlp"))
    assert w.sharding.spec[1] == "expert" and len(w.sharding.device_set) == 8
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape[1] == w.shape[1] // 2
    pool = eng.pools.moe.c_kv.sharding
    assert pool.mesh == eng.mesh and pool.spec == jax.sharding.PartitionSpec(sharding.logical_to_spec(("layers",))[0])
    assert eng.batch_multiple == 4  # data x expert
    ids = [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS[:4]]
    eng.run()
    for rid, want in zip(ids, alone):
        assert eng.result(rid).output == want


class CharTokenizer:
    """One character per token id: decoded text positions are token positions."""

    def decode(self, ids):
        return "".join(chr(0x41 + i) for i in ids)


def test_stop_strings_cut_the_text(model, alone):
    tok = CharTokenizer()
    want = alone[1]
    text = tok.decode(want)
    stop = text[6:9]
    cut = text.find(stop)
    eng = engine(model, tokenizer=tok)
    rid = eng.submit(PROMPTS[1], NEW, stop_ids=(), stop_strings=(stop, "never-matches"))
    eng.run()
    req = eng.result(rid)
    assert req.finish_reason == "stop" and req.text == text[:cut] and stop not in req.text
    assert tok.decode(req.output) == text[:cut + 1] and req.output == want[:len(req.output)]  # up to its start
    with pytest.raises(UserError, match="tokenizer"):
        engine(model).submit(PROMPTS[1], 4, stop_strings=("x",))


def _ref_logprobs(model, req, temperature=0.0, top_k=0):
    """log-softmax of one full forward over the request's prompt + output (the reference), after the request's
    temperature and top-k when it samples: [len(sequence), V] in numpy."""
    logits = np.asarray(decoding.logits(model, np.asarray([req.sequence], np.int32))[0][0], np.float64)
    if temperature > 0:
        logits = logits / temperature
        if top_k:
            kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
            logits = np.where(logits >= kth, logits, -np.inf)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_logprobs_equal_the_full_forwards_log_softmax(model, speculative):
    """Each output token's log-probability and top-5 alternatives, and each prompt token's (the first: None),
    equal the log-softmax of one full forward over prompt + output at the position before the token (within
    1e-4), for a greedy request (raw log-probabilities) and a sampled one (after temperature 0.7 and top-k 8),
    under preemption (the small pool) and speculation; a prompt-logprob request takes no prefix-cache hit."""
    eng = engine(model, speculative=speculative)
    warm = eng.submit(PROMPTS[3], NEW, stop_ids=())  # registers PROMPTS[3]'s pages in the prefix table
    eng.run()
    sampled = SamplingParams(temperature=0.7, top_k=8, seed=3)
    ids = [eng.submit(PROMPTS[3], NEW, stop_ids=(), logprobs=5, prompt_logprobs=5),
           eng.submit(PROMPTS[1], NEW, sampled, stop_ids=(), logprobs=3),
           eng.submit(PROMPTS[4], NEW, stop_ids=())]
    eng.run()
    assert eng.result(warm).output == eng.result(ids[0]).output and eng.result(ids[0]).prefix_hit_tokens == 0
    for rid, (t, k, n) in zip(ids[:2], [(0.0, 0, 5), (0.7, 8, 3)]):
        req = eng.result(rid)
        ref = _ref_logprobs(model, req, t, k)
        P = len(req.prompt)
        assert len(req.token_logprobs) == len(req.output) == NEW
        for j, (tok, (lp, top)) in enumerate(zip(req.output, req.token_logprobs)):
            row = ref[P - 1 + j]
            assert abs(lp - row[tok]) < 1e-4, (j, lp, row[tok])
            assert [i for i, _ in top] == list(np.argsort(-row)[:n]) and len(top) == n
            np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:n], atol=1e-4)
        if req.prompt_lps is not None:
            assert req.prompt_lps[0] is None and len(req.prompt_lps) == P
            for j in range(1, P):
                lp, top = req.prompt_lps[j]
                assert abs(lp - ref[j - 1, req.prompt[j]]) < 1e-4
                assert [i for i, _ in top] == list(np.argsort(-ref[j - 1])[:5])
    assert eng.result(ids[1]).prompt_lps is None and eng.result(ids[2]).token_logprobs == []
    with pytest.raises(UserError, match=r"logprobs=21 must be in \[0, 20\]"):
        eng.submit(PROMPTS[0], 4, logprobs=21)


def test_a_failing_step_fails_only_its_requests_and_the_engine_recovers(model, alone):
    """Fault injection. A decode step that raises fails the requests in it (finish_reason 'error', the error's
    text kept) and nothing else: the next requests are served as if nothing happened. A step that raises after
    its donated page pools are consumed (deleted here by hand) makes the engine rebuild empty pools and
    recompute every running request: their tokens are still the reference's."""
    eng = engine(model, max_batch=2)
    real = eng._run_decode
    faults = {"n": 1, "delete": False}

    def flaky(work):
        out = real(work)
        if faults["n"] > 0:
            faults["n"] -= 1
            if faults["delete"]:
                for x in jax.tree.leaves(eng.pools):
                    x.delete()
            raise RuntimeError("injected decode failure")
        return out

    eng._run_decode = flaky
    a, b = eng.submit(PROMPTS[0], NEW, stop_ids=()), eng.submit(PROMPTS[1], NEW, stop_ids=())
    c = eng.submit(PROMPTS[2], NEW, stop_ids=())  # waits (max_batch=2) while a and b fail
    eng.run()
    for rid in (a, b):
        req = eng.result(rid)
        assert req.finish_reason == "error" and "injected decode failure" in req.error
    assert eng.result(c).output == alone[2] and eng.pool.used == 0
    eng.submit(PROMPTS[4], NEW, stop_ids=())  # registers PROMPTS[4]'s pages in the prefix table
    eng.run()
    faults.update(n=1, delete=True)
    failing = eng.submit(PROMPTS[0], NEW, stop_ids=())
    eng.run()  # its first decode step raises with the pools gone: the pools and the prefix table are rebuilt
    assert eng.result(failing).finish_reason == "error"
    again = eng.submit(PROMPTS[4], NEW, stop_ids=())
    eng.run()
    assert eng.result(again).prefix_hit_tokens == 0  # (before the failure it would hit 16 tokens)
    assert eng.result(again).output == alone[4] and not any(x.is_deleted() for x in jax.tree.leaves(eng.pools))
    # Requests running but not in the failed step (their cache went with the pools) are recomputed:
    running = [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS[:2]]
    eng.step()  # both prefilled, both have cache content now
    for x in jax.tree.leaves(eng.pools):
        x.delete()
    assert eng._recover([], RuntimeError("a step of others")) == []
    assert [r.rid for r in eng.scheduler.waiting] == running and eng.pool.used == 0
    eng.run()
    assert [eng.result(r).output for r in running] == alone[:2]


def test_preemption_takes_the_newest_running_request_first():
    """A hand trace on the scheduler alone: a pool of 6 usable pages of 4 tokens, three requests admitted in
    order (r0, r1, r2) with 5-token prompts (2 pages each). When r0, the oldest, needs a third page, the newest
    (r2) gives its pages back, not r1; r2 goes back to the front of the queue. When the newest running request
    needs a page itself and none is free, it is the one preempted (never an older one for it)."""
    from dsv3_jax.infer.scheduler import Request, Scheduler

    pool = PagePool(7, 4)
    sch = Scheduler(pool, max_batch=3, max_batch_tokens=16, max_prefill_chunk=16, prefix_sharing=False)
    reqs = [Request(i, [10 + i] * 5, 8) for i in range(3)]
    for r in reqs:
        sch.add(r)
    work = sch.schedule()
    assert [w.request.rid for w in work] == [0, 1, 2] and pool.available == 0
    for w in work:  # the prefill ran; each request emitted one token (the engine's bookkeeping, by hand)
        w.request.computed += w.n
        w.request.output.append(1)
    reqs[0].output += [1, 1, 1]  # r0 jumps ahead: its next token (position 8) needs a third page
    reqs[0].computed += 3
    work = sch.schedule()
    assert [r.rid for r in sch.running] == [0, 1] and [r.rid for r in sch.waiting] == [2]
    assert reqs[2].pages == [] and reqs[2].preemptions == 1 and len(reqs[0].pages) == 3
    assert [w.request.rid for w in work] == [0, 1]
    reqs[1].output += [1, 1, 1]  # now r1 (the newest running) needs a page and none is free: r1 gives way
    reqs[1].computed += 3
    pool.allocate(pool.available)  # (nothing free)
    work = sch.schedule()
    assert [r.rid for r in sch.running] == [0] and [r.rid for r in sch.waiting] == [1, 2]
    assert reqs[0].preemptions == 0 and reqs[1].preemptions == 1


def test_speculative_sampling_of_a_one_token_prompt_draws_its_first_token_from_the_model(model):
    """A one-token prompt has nothing to prefill: it once went straight to a verify step with no draft, whose
    empty draft distribution accepted token 0 every time. Its first token is the one plain decoding draws with
    the same seed (the key of output token 0 is the same in both), for every seed."""
    plain, spec = engine(model, pages=64), engine(model, pages=64, speculative=True)
    firsts = []
    for eng in (plain, spec):
        ids = [eng.submit([20], 2, SamplingParams(temperature=1.0, seed=s), stop_ids=()) for s in range(8)]
        eng.run()
        firsts.append([eng.result(r).output[0] for r in ids])
    assert firsts[0] == firsts[1] and len(set(firsts[0])) > 2, firsts


def test_a_wrong_page_table_is_caught_by_the_reference(model, alone):
    """The tests above can fail: an engine whose page tables are off by one page for every row after the first
    (each reads its neighbour's cache) no longer gives the reference's greedy tokens."""
    eng = engine(model, pages=64)
    real = eng._tables

    def shifted(work, rows, width=None):
        t = real(work, rows, width)
        return np.roll(t, 1, axis=0) if len(work) > 1 else t

    eng._tables = shifted
    ids = [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS[:4]]
    eng.run()
    assert [eng.result(r).output for r in ids] != alone[:4]


def test_penalties_and_logit_bias_equal_a_full_forward_reference(model):
    """presence, frequency and repetition penalties and a logit bias, greedy: each token is the argmax of the full
    forward's last logits after the transforms computed in numpy from the request's tokens so far (OpenAI's and
    vLLM's definitions), step by step; a request without them in the same batch is unchanged."""
    s = SamplingParams(presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.5, logit_bias=((5, 1.5),))
    eng = engine(model, pages=64)
    rid = eng.submit(PROMPTS[1], NEW, s, stop_ids=())
    plain = eng.submit(PROMPTS[0], NEW, stop_ids=())
    eng.run()
    prompt, out = PROMPTS[1], []
    L = 32
    for _ in range(NEW):
        seq = prompt + out
        buf = np.zeros((1, L), np.int32)
        buf[0, :len(seq)] = seq
        l = np.asarray(decoding.logits(model, buf)[0][0, len(seq) - 1], np.float64)
        l[5] += 1.5
        seen = np.zeros_like(l, bool)
        seen[seq] = True
        l = np.where(seen, np.where(l > 0, l / 1.5, l * 1.5), l)
        counts = np.bincount(out, minlength=l.size) if out else np.zeros(l.size)
        l = l - 0.4 * counts - 0.6 * (counts > 0)
        out.append(int(np.argmax(l)))
    got = eng.result(rid).output
    assert got == out and got != decoding.greedy(model, [PROMPTS[1]], NEW)[0]
    assert eng.result(plain).output == decoding.greedy(model, [PROMPTS[0]], NEW)[0]
    with pytest.raises(UserError, match="not supported with MTP"):
        engine(model, speculative=True).submit(PROMPTS[0], 4, s)


def test_greedy_speculation_drafts_and_accepts_what_the_full_forward_predicts(model, alone):
    """The drafted / accepted counts of greedy MTP speculation, request by request, equal a simulation on the
    full forward's teacher-forced logits over prompt + the reference's greedy output: the draft after emitting
    the token at position t is the MTP head's argmax at t - 1 (it reads token t and predicts t + 1); a verify
    step accepts it iff it equals the next greedy token, then emits two tokens (the next draft: MTP at the
    second's position - 1), else one; steps run until max_tokens are out."""
    eng = engine(model, speculative=True, pages=64)
    ids = [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS]
    eng.run()
    for rid, p, out in zip(ids, PROMPTS, alone):
        seq = list(p) + out
        _, mtp = decoding.logits(model, np.asarray([seq], np.int32))
        pred = np.asarray(jnp.argmax(mtp[0][0], -1))  # pred[t]: MTP at t predicts token t + 2
        P = len(p)
        pos, emitted, drafted, accepted = P, 1, 0, 0  # pos: the pending token's position (emitted, not fed)
        draft = pred[P - 1]
        while emitted < NEW:
            drafted += 1
            if pos + 1 < len(seq) and draft == seq[pos + 1]:
                accepted += 1
                emitted += 2
                draft = pred[pos + 1] if pos + 1 < len(pred) else -1
                pos += 2
            else:
                emitted += 1
                draft = pred[pos]
                pos += 1
        req = eng.result(rid)
        assert req.output == out and (req.drafted, req.accepted) == (drafted, accepted), (rid, req.drafted,
                                                                                          req.accepted, drafted,
                                                                                          accepted)
