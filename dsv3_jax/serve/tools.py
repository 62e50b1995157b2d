"""Tool calls in the model's own format: one parser per format, for whole answers and for streams.

    parser = PARSERS["deepseek_v3"]
    content, calls = parser.whole(text)           # calls: [ToolCall(name, arguments JSON text)]; malformed
                                                  # output: (text, []) - plain content, never an error
    stream = ToolStream(parser)
    for delta in stream.push(text_so_far): ...    # {"content": str} or {"index", "id"?, "name"?, "arguments"}

Formats (as the models write them; the markers are the tokenizer's added tokens):
  deepseek_v3   DeepSeek-V3 and R1: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
                ```json\\n{ARGS}\\n```<｜tool▁call▁end｜> ... <｜tool▁calls▁end｜>
  deepseek_v31  DeepSeek-V3.1: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGS}<｜tool▁call▁end｜>
                ... <｜tool▁calls▁end｜>
  kimi_k2       Kimi-K2: <|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
                <|tool_call_argument_begin|>{ARGS}<|tool_call_end|> ... <|tool_calls_section_end|>
  deepseek_v32  DeepSeek-V3.2's DSML: <｜DSML｜function_calls> <｜DSML｜invoke name="NAME"> <｜DSML｜parameter
                name="KEY" string="true|false">VALUE</｜DSML｜parameter> ... </｜DSML｜invoke> ...
                </｜DSML｜function_calls> (dsml.py: its prompt encoder); arguments are sent whole per call

A parser reads the text so far and returns the content before the tool section and every call it can see, the
last one's arguments as far as they go (text that may be the start of a marker is held back). `ToolStream`
turns successive views into OpenAI's deltas: the content as it grows, then per call its name first (with an id)
and its arguments in fragments, which the official client concatenates. An answer whose tool section does not
parse (a marker out of place, arguments that are not a JSON object) is plain content as a whole answer; a stream
sends what it has seen as content from the point where the section stopped making sense.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    complete: bool = True  # its end marker has been seen

    def openai(self, id_: str) -> dict:
        return {"id": id_, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _held(text: str, markers) -> int:
    """Characters at the end of `text` that may be the start of one of `markers` (held back while streaming)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class Malformed(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class MarkerFormat:
    """A format of markers: section begin / end, call begin / end, and how a call's head (between call begin and
    the arguments) names the function."""

    name: str
    section_begin: str
    section_end: str
    call_begin: str
    call_end: str
    head_end: str  # ends the call's head (the arguments follow)
    head: re.Pattern  # the head's text -> group 'name'
    args_open: str = ""  # text around the arguments (DeepSeek-V3's JSON fence)
    args_close: str = ""

    @property
    def markers(self):
        return [m for m in (self.section_begin, self.section_end, self.call_begin, self.call_end, self.head_end,
                            self.args_close) if m]

    def whole(self, text: str) -> tuple[str, list[ToolCall]]:
        try:
            content, calls, _ = self.parse(text, final=True)
        except Malformed:
            return text, []
        if any(not c.complete for c in calls):
            return text, []
        for c in calls:
            try:
                if not isinstance(json.loads(c.arguments), dict):
                    raise ValueError
            except ValueError:
                return text, []
        return content, calls

    def parse(self, text: str, final: bool = False) -> tuple[str, list[ToolCall], int]:
        """(content, calls, characters of `text` accounted for). Raises Malformed for a section out of shape.
        Not final: a possible partial marker at the end is not consumed."""
        start = text.find(self.section_begin)
        if start < 0:
            hold = 0 if final else _held(text, [self.section_begin])
            return text[:len(text) - hold], [], len(text) - hold
        content, pos, calls = text[:start], start + len(self.section_begin), []
        while True:
            rest = text[pos:].lstrip("\n")  # (calls may be separated by newlines)
            pos = len(text) - len(rest)
            if rest.startswith(self.section_end):
                return content, calls, pos + len(self.section_end)
            if not rest or (not final and (self.section_end.startswith(rest) or self.call_begin.startswith(rest))):
                return content, calls, pos  # (more to come; or, final, a section cut short: the calls decide)
            if not rest.startswith(self.call_begin):
                raise Malformed(f"expected {self.call_begin!r} at {rest[:20]!r}")
            pos += len(self.call_begin)
            h = text.find(self.head_end, pos)
            if h < 0:
                return content, calls, pos  # the head is still coming
            m = self.head.fullmatch(text[pos:h].strip())
            if m is None:
                raise Malformed(f"a tool call head {text[pos:h]!r} names no function")
            pos = h + len(self.head_end)
            if self.args_open:
                opened = text[pos:]
                if not opened.startswith(self.args_open):
                    if not final and self.args_open.startswith(opened):
                        calls.append(ToolCall(m.group("name"), "", complete=False))
                        return content, calls, pos
                    raise Malformed(f"expected {self.args_open!r} before the arguments")
                pos += len(self.args_open)
            close = self.args_close + self.call_end if self.args_close else self.call_end
            e = text.find(close, pos)
            if e < 0:
                args = text[pos:]
                hold = 0 if final else _held(args, [close])
                calls.append(ToolCall(m.group("name"), args[:len(args) - hold], complete=False))
                return content, calls, len(text) - hold
            calls.append(ToolCall(m.group("name"), text[pos:e]))
            pos = e + len(close)


DEEPSEEK_V3 = MarkerFormat("deepseek_v3", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                           "<｜tool▁call▁end｜>", "\n", re.compile(r"\w*<｜tool▁sep｜>(?P<name>[^\s<]+)"),
                           args_open="```json\n", args_close="\n```")
DEEPSEEK_V31 = MarkerFormat("deepseek_v31", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                            "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", re.compile(r"(?P<name>[^\s<]+)"))
KIMI_K2 = MarkerFormat("kimi_k2", "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                       "<|tool_call_end|>", "<|tool_call_argument_begin|>",
                       re.compile(r"(?:functions\.)?(?P<name>[^\s:<]+):\d+"))
def _literal(text: str, token_id) -> str:
    """A piece of a Lark grammar that writes `text`: its token when the tokenizer has it as one (`<[id]>`), else
    the string."""
    tid = token_id(text)
    return f"<[{tid}]>" if tid is not None else json.dumps(text)


def _dsml_grammar(tools: list[dict], parallel: bool) -> str:
    """V3.2's tool section as a Lark grammar: per tool an invoke with its schema's required parameters in order,
    strings as they are (string="true": one of an enum, else text without '<'; a pattern or format is not
    enforced), the others as JSON under their own schema."""
    q = json.dumps  # a Lark string literal
    nl = q("\n")
    rules, calls = [], []
    for i, t in enumerate(tools):
        f = t["function"]
        schema = f.get("parameters") or {}
        props = schema.get("properties") or {}
        params = []
        for j, key in enumerate(schema.get("required") or []):
            sub = props.get(key, {})
            head = f'<{D}parameter name="{key}" string='
            enum = sub.get("enum")
            if enum and all(isinstance(v, str) for v in enum):  # written as they are (string="true")
                value = "(" + " | ".join(q(v) for v in enum) + ")"
                rules.append(f"p{i}_{j}: {q(head + chr(34) + 'true' + chr(34) + '>')} {value} {q(PARAM_END)}")
            elif sub.get("type") == "string":  # (a pattern or format is not enforced here)
                rules.append(f"p{i}_{j}: {q(head + chr(34) + 'true' + chr(34) + '>')} /[^<]*/ {q(PARAM_END)}")
            else:
                rules.append(f"p{i}_{j}: {q(head + chr(34) + 'false' + chr(34) + '>')} v{i}_{j} {q(PARAM_END)}")
                rules.append(f"v{i}_{j}: %json {json.dumps(sub)}")
            params.append(f"p{i}_{j}")
        invoke = q(f'<{D}invoke name="{f["name"]}">')
        rules.append(f"call{i}: {invoke} {nl} {(' ' + nl + ' ').join(params) or q('')} {nl} {q(INVOKE_END)}")
        calls.append(f"call{i}")
    call = "(" + " | ".join(calls) + ")"
    many = f"{call} ({nl} {call})*" if parallel else call
    return "\n".join([f"start: {q(CALLS_BEGIN)} {nl} {many} {nl} {q(CALLS_END)}"] + rules) + "\n"


def call_grammar(fmt: MarkerFormat, tools: list[dict], token_id, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect: `%json` schemas, `<[id]>` tokens) of a tool section in `fmt` that calls
    one of `tools` (or several, with `parallel`), each call's arguments held to its JSON schema: what
    `tool_choice` 'required' or a named function makes the model write (serve/structured.py enforces it)."""
    if fmt.name == "deepseek_v32":
        return _dsml_grammar(tools, parallel)
    lit = lambda text: _literal(text, token_id)  # noqa: E731
    rules, calls = [], []
    for i, t in enumerate(tools):
        f = t["function"]
        schema = f.get("parameters") or {"type": "object"}
        name = f["name"]
        if fmt.name == "deepseek_v3":
            head = f'{lit(fmt.call_begin)} "function" {lit("<｜tool▁sep｜>")} {json.dumps(name + fmt.head_end)}'
            body = f"{json.dumps(fmt.args_open)} args{i} {json.dumps(fmt.args_close)}"
        elif fmt.name == "deepseek_v31":
            head, body = f"{lit(fmt.call_begin)} {json.dumps(name)} {lit(fmt.head_end)}", f"args{i}"
        else:  # kimi_k2
            head = f'{lit(fmt.call_begin)} {json.dumps("functions." + name + ":")} /[0-9]/ {lit(fmt.head_end)}'
            body = f"args{i}"
        rules.append(f"call{i}: {head} {body} {lit(fmt.call_end)}")
        rules.append(f"args{i}: %json {json.dumps(schema)}")
        calls.append(f"call{i}")
    sep = ' "\\n"?' if fmt.name == "deepseek_v3" else ""  # (V3's template puts a newline between calls)
    call = "(" + " | ".join(calls) + ")"
    many = f"{call} ({sep} {call})*" if parallel else call
    return "\n".join([f"start: {lit(fmt.section_begin)} {many} {lit(fmt.section_end)}"] + rules) + "\n"


D = "｜DSML｜"  # DeepSeek-V3.2's markup (dsml.py writes it into prompts)
CALLS_BEGIN, CALLS_END = f"<{D}function_calls>", f"</{D}function_calls>"
INVOKE_END, PARAM_END = f"</{D}invoke>", f"</{D}parameter>"
INVOKE = re.compile(rf'<{D}invoke name="(?P<name>[^"]+)">')
PARAM = re.compile(rf'<{D}parameter name="(?P<key>[^"]+)" string="(?P<s>true|false)">')


class DsmlFormat:
    """V3.2's tool calls, read as tools.MarkerFormat reads the others (`whole`, `parse`). A call's arguments are
    known once its invoke closes (then sent whole); its name as soon as the invoke tag is complete."""

    name = "deepseek_v32"
    markers = [CALLS_BEGIN, CALLS_END, INVOKE_END, PARAM_END, f"<{D}invoke", f"<{D}parameter"]

    def whole(self, text: str) -> tuple[str, list[ToolCall]]:
        try:
            content, calls, _ = self.parse(text, final=True)
        except Malformed:
            return text, []
        if not calls or any(not c.complete for c in calls):
            return (text, []) if CALLS_BEGIN in text else (content, [])
        return content, calls

    def parse(self, text: str, final: bool = False):
        start = text.find(CALLS_BEGIN)
        if start < 0:
            hold = 0 if final else _held(text, [CALLS_BEGIN, "\n\n" + CALLS_BEGIN])
            return text[:len(text) - hold], [], len(text) - hold
        content, pos, calls = text[:start].rstrip("\n"), start + len(CALLS_BEGIN), []
        while True:
            rest = text[pos:].lstrip("\n")
            pos = len(text) - len(rest)
            if rest.startswith(CALLS_END):
                return content, calls, pos + len(CALLS_END)
            m = INVOKE.match(rest)
            if m is None:
                opening = f'<{D}invoke name="'
                partial = opening.startswith(rest) or CALLS_END.startswith(rest) or (
                    rest.startswith(opening) and '">' not in rest)
                if not rest or (not final and partial):
                    return content, calls, pos
                raise Malformed(f"expected an invoke at {rest[:30]!r}")
            end = rest.find(INVOKE_END)
            if end < 0:
                calls.append(ToolCall(m.group("name"), "", complete=False))
                return content, calls, pos
            calls.append(ToolCall(m.group("name"), json.dumps(self._arguments(rest[m.end():end]), ensure_ascii=False)))
            pos += end + len(INVOKE_END)

    @staticmethod
    def _arguments(body: str) -> dict:
        args, pos = {}, 0
        while True:
            body_rest = body[pos:].lstrip("\n")
            if not body_rest:
                return args
            m = PARAM.match(body_rest)
            e = body_rest.find(PARAM_END)
            if m is None or e < 0:
                raise Malformed(f"expected a parameter at {body_rest[:30]!r}")
            value = body_rest[m.end():e]
            if m.group("s") == "true":
                args[m.group("key")] = value
            else:
                try:
                    args[m.group("key")] = json.loads(value)
                except ValueError:
                    raise Malformed(f"parameter {m.group('key')!r} is not JSON: {value[:30]!r}") from None
            pos = len(body) - len(body_rest) + e + len(PARAM_END)


DSML = DsmlFormat()


PARSERS = {p.name: p for p in (DEEPSEEK_V3, DEEPSEEK_V31, KIMI_K2, DSML)}


def detect_parser(chat_template: str | None, vocab: dict | None = None) -> str | None:
    """The tool format a checkpoint speaks, from its chat template (or its vocabulary): None if no known one."""
    text = chat_template or ""
    if text == "deepseek_v32" or D in text:  # (V3.2 has no template: its encoder stands for it)
        return "deepseek_v32"
    if "<|tool_calls_section_begin|>" in text or (vocab and "<|tool_calls_section_begin|>" in vocab):
        return "kimi_k2"
    if "<｜tool▁calls▁begin｜>" in text:
        # V3 / R1 write "function<｜tool▁sep｜>NAME\n```json"; V3.1 writes "NAME<｜tool▁sep｜>{args}"
        return "deepseek_v3" if "```json" in text else "deepseek_v31"
    return None


class ToolStream:
    """OpenAI streaming deltas from successive views of one answer's text (see the module docstring)."""

    def __init__(self, parser: MarkerFormat):
        self.parser = parser
        self.content_sent = 0
        self.calls_sent: list[list] = []  # per call: [id, arguments sent]
        self.broken_at: int | None = None  # the section stopped parsing here: the rest is content

    def push(self, text: str, final: bool = False) -> list[dict]:
        out = []
        if self.broken_at is None:
            try:
                content, calls, _ = self.parser.parse(text, final)
            except Malformed:
                self.broken_at = self.content_sent
                content, calls = None, []
        if self.broken_at is not None:  # plain content from where it broke (what was sent as calls stays sent)
            if not self.calls_sent and len(text) > self.content_sent:
                out.append({"content": text[self.content_sent:]})
                self.content_sent = len(text)
            return out
        if len(content) > self.content_sent and not self.calls_sent:
            out.append({"content": content[self.content_sent:]})
            self.content_sent = len(content)
        for i, c in enumerate(calls):
            if i == len(self.calls_sent):
                id_ = "call_" + uuid.uuid4().hex[:24]
                self.calls_sent.append([id_, 0])
                out.append({"index": i, "id": id_, "name": c.name, "arguments": ""})
            sent = self.calls_sent[i][1]
            if len(c.arguments) > sent:
                out.append({"index": i, "arguments": c.arguments[sent:]})
                self.calls_sent[i][1] = len(c.arguments)
        return out

    @property
    def called(self) -> bool:
        return bool(self.calls_sent)
