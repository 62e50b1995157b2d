"""The serving engine (dsv3_jax/infer/engine.py) against `Generator` (the static-batch reference, itself tested
against the full forward in test_infer.py), and its parts against plain references: the paged cache against
a dense per-row cache, the page pool's counts, the scheduler under memory pressure.

The model is test_infer's small random DeepSeek-V3 (1 dense + 2 MoE layers, std 0.2: tokens are sensitive
to any wrong number). Greedy tokens must be equal, request by request, to that prompt decoded alone.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from test_infer import draftable_model

from dsv3_jax.cli import UserError
from dsv3_jax.infer.engine import Engine
from dsv3_jax.infer.generate import Generator
from dsv3_jax.infer.paged_cache import PagedLatentCache, PagePool, PoolExhausted, page_keys
from dsv3_jax.infer.sampling import SamplingParams
from dsv3_jax.mla import LatentCache

from reference import tiny_config

NEW = 12
PROMPTS = [[3, 5, 7, 11, 2], [9, 2, 4, 4, 8, 10, 11, 30, 31, 17, 6], [20], list(range(2, 40)),
           [3, 5, 7, 11, 2, 8, 8, 9, 1, 4, 6, 12, 13, 14, 15, 16, 17, 18, 19, 21], [41, 42, 43, 44, 45, 46]]
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def model():
    return draftable_model()


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt decoded alone by the reference Generator."""
    gen = Generator(model, capacity=64, cache_dtype=jnp.float32, prefill_bucket=16)
    return [gen.generate([p], NEW, GREEDY, stop_tokens=())[0].tokens for p in PROMPTS]


def engine(model, **kw):
    args = dict(page_size=4, max_batch=4, max_batch_tokens=24, max_prefill_chunk=16, pages=64, decode_steps=3,
                cache_dtype=jnp.float32)
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
    eng = engine(model, pages=15, max_batch=4)
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
    tokens are plain greedy's, drafts are both accepted and rejected; with a tiny pool it also survives
    preemption, and a repeated prompt hits the prefix table (keys include the token after each page)."""
    eng = engine(model, speculative=True, pages=18)
    ids = [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS]
    eng.run()
    for rid, want in zip(ids, alone):
        assert eng.result(rid).output == want
    drafted = sum(eng.result(i).drafted for i in ids)
    accepted = sum(eng.result(i).accepted for i in ids)
    assert 0 < accepted < drafted, (accepted, drafted)
    again = eng.submit(PROMPTS[3], NEW, stop_ids=())
    eng.run()
    assert eng.result(again).output == alone[3] and eng.result(again).prefix_hit_tokens > 0


def test_engine_on_a_mesh_equals_one_device(model, alone):
    """Rows over data x expert, experts over 'expert', heads over 'tensor' (8 fake CPU devices)."""
    from dsv3_jax import sharding

    mesh = sharding.make_mesh({"data": 2, "expert": 2, "tensor": 2})
    eng = engine(model, mesh=mesh)
    ids = [eng.submit(p, NEW, stop_ids=()) for p in PROMPTS[:4]]
    eng.run()
    for rid, want in zip(ids, alone):
        assert eng.result(rid).output == want
    w = eng.state["moe_layers"]["ffn"]["w_gate"][...]
    assert w.sharding.spec[1] == "expert" and len(w.sharding.device_set) == 8


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
