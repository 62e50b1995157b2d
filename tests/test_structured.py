"""Structured outputs (dsv3_jax/serve/structured.py: llguidance's token masks applied in the engine's sampler):
the real engine on a small random model, which left alone writes anything; under a grammar every output
parses and validates against its JSON schema (jsonschema, a validator no one here wrote), at temperature 1 and
greedy, batched with free rows whose tokens stay exactly the reference's; regexes and choices match.
"""
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax.cli import UserError
from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.engine import Engine
from dsv3_jax.infer.sampling import SamplingParams
from dsv3_jax.model import DeepSeekV3

from reference import decoding

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def setup():
    from dsv3_jax.data import bpe
    from dsv3_jax.serve.structured import Grammars

    texts = ['{"name": "Ann", "age": 31, "tags": ["a"]}', "The quick brown fox 123.", "abc-42 yes no maybe"] * 40
    tok = bpe.train_tokenizer(texts, vocab_size=300)
    cfg = ModelConfig(vocab_size=320, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
                      num_hidden_layers=2, num_attention_heads=2, q_lora_rank=24, kv_lora_rank=24, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                      topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=256,
                      dtype="float32", param_dtype="float32", initializer_range=0.2)
    model = DeepSeekV3(cfg, rngs=nnx.Rngs(3))
    return model, tok, Grammars(tok, cfg.vocab_size, eos_ids=(1,))


def engine(model, tok):
    return Engine(model, page_size=8, max_batch=8, max_batch_tokens=64, pages=128, decode_steps=3,
                  cache_dtype=jnp.float32, tokenizer=tok, max_seq_len=200)


def test_json_schema_outputs_validate_batched_with_free_rows(setup):
    model, tok, grammars = setup
    eng = engine(model, tok)
    prompt = tok.encode("The quick brown fox").ids
    bound = [eng.submit(prompt, 120, SamplingParams(temperature=t, seed=s), stop_ids=(1,),
                        constraint=grammars.make({"type": "json_schema", "json_schema": {"schema": SCHEMA}}))
             for t, s in [(1.0, 0), (1.0, 1), (1.0, 2), (0.0, 0)]]
    obj = eng.submit(prompt, 150, SamplingParams(temperature=1.0, seed=5), stop_ids=(1,),
                     constraint=grammars.make({"type": "json_object"}))
    free = eng.submit(prompt, 12, stop_ids=())
    eng.run()
    outs = []
    for rid in bound:
        req = eng.result(rid)
        text = tok.decode(req.output)
        assert req.finish_reason == "stop", (req.finish_reason, text)
        value = json.loads(text)
        jsonschema.validate(value, SCHEMA)
        outs.append(value)
    assert len({json.dumps(v) for v in outs}) > 1  # sampled: not one answer four times
    # an unbounded object may run to max_tokens: then it is a prefix the grammar (a fresh matcher) accepts
    out = eng.result(obj).output
    if eng.result(obj).finish_reason == "stop":
        assert isinstance(json.loads(tok.decode(out)), dict)
    assert grammars.make({"type": "json_object"}).matcher.validate_tokens(out) == len(out) > 10
    assert eng.result(free).output == decoding.greedy(model, [prompt], 12)[0]  # the free row is untouched
    assert eng.pool.used == 0


def test_regex_and_choice(setup):
    model, tok, grammars = setup
    eng = engine(model, tok)
    prompt = tok.encode("abc").ids
    rx = [eng.submit(prompt, 40, SamplingParams(temperature=1.0, seed=s), stop_ids=(1,),
                     constraint=grammars.make({"regex": r"[a-c]{2,4}-\d{1,3}"}, "structured_outputs"))
          for s in range(3)]
    ch = [eng.submit(prompt, 40, SamplingParams(temperature=1.0, seed=s), stop_ids=(1,),
                     constraint=grammars.make({"choice": ["yes", "no", "maybe"]}, "structured_outputs"))
          for s in range(6)]
    eng.run()
    for rid in rx:
        assert re.fullmatch(r"[a-c]{2,4}-\d{1,3}", tok.decode(eng.result(rid).output)), tok.decode(
            eng.result(rid).output)
    got = {tok.decode(eng.result(r).output) for r in ch}
    assert got <= {"yes", "no", "maybe"} and len(got) >= 2, got
    with pytest.raises(UserError, match="response_format"):
        grammars.make({"type": "json_schema", "json_schema": {"schema": {"type": 5}}})
    with pytest.raises(UserError, match="structured_outputs"):
        grammars.make({"nothing": 1}, "structured_outputs")


def test_the_mask_is_exactly_the_grammars(setup):
    """The engine's masked sampler never draws outside the mask: a grammar whose allowed set is one token at a
    time (a fixed string) forces the output to that string's tokens, whatever the model prefers."""
    model, tok, grammars = setup
    eng = engine(model, tok)
    target = "abc-42"
    rid = eng.submit(tok.encode("zzz").ids, 30, SamplingParams(temperature=1.0, seed=9), stop_ids=(1,),
                     constraint=grammars.make({"choice": [target]}, "structured_outputs"))
    eng.run()
    assert tok.decode(eng.result(rid).output) == target
    mask = grammars.make({"choice": [target]}, "structured_outputs").allowed()
    assert mask.dtype == bool and mask.shape == (320,) and 0 < mask.sum() < 320
    assert np.all(~mask[300:])  # ids past the tokenizer's vocabulary are never allowed


def test_structured_outputs_under_mtp_speculation_equal_decoding_without_it():
    """Drafts are checked against the grammar (a draft it refuses is never accepted; the second token of an
    accepted pair is drawn under the grammar advanced by the draft): greedy constrained decoding with MTP
    speculation gives exactly the tokens of constrained decoding without it, and accepts some drafts."""
    from test_infer import draftable_model

    from dsv3_jax.data import bpe
    from dsv3_jax.serve.structured import Grammars

    model = draftable_model(vocab_size=320)
    tok = bpe.train_tokenizer(["abc-42 yes no maybe 0123456789 [1, 2]"] * 50, vocab_size=model.cfg.vocab_size)
    grammars = Grammars(tok, model.cfg.vocab_size, eos_ids=(1,))
    spec = {"type": "json_schema", "json_schema": {"schema": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4}}}
    outs = []
    for speculative in (False, True):
        eng = Engine(model, page_size=4, max_batch=4, max_batch_tokens=24, pages=64, decode_steps=3,
                     cache_dtype=jnp.float32, tokenizer=tok, max_seq_len=56, speculative=speculative)
        ids = [eng.submit(p, 40, stop_ids=(1,), constraint=grammars.make(spec)) for p in ([3, 5, 7], [20], [9, 2, 4])]
        eng.run()
        outs.append([eng.result(r).output for r in ids])
        assert all(eng.result(r).finish_reason == "stop" for r in ids)
        if speculative:
            assert sum(eng.result(r).accepted for r in ids) > 0
    assert outs[0] == outs[1]
    for out in outs[1]:
        value = json.loads(tok.decode(out))
        assert isinstance(value, list) and all(isinstance(v, int) for v in value)


def test_a_thinking_model_thinks_before_the_format_holds(setup):
    """AfterReasoning: under a prompt that opened <think>, every token is free until the end-of-reasoning token,
    then the grammar holds (exactly its mask), and the request is done when the grammar is."""
    from dsv3_jax.serve.structured import AfterReasoning

    model, tok, grammars = setup
    END = 7  # (the id standing for </think> here)
    g = AfterReasoning(grammars.make({"choice": ["yes"]}, "structured_outputs"), END)
    assert g.allowed().all() and not g.done
    assert g.advance(42) and g.advance(99) and g.allowed().all()  # thinking: anything goes
    assert g.advance(END)
    plain = grammars.make({"choice": ["yes"]}, "structured_outputs")
    np.testing.assert_array_equal(g.allowed(), plain.allowed())
    for t in tok.encode("yes").ids:
        assert g.advance(t)
    assert g.done
