"""DeepSeek-V3.2's chat format: the prompt encoder it ships instead of a Jinja template, and its DSML tool calls.

    text = encode_v32(messages, tools=None, thinking=False)   # the prompt, BOS first, the answer's turn open

(Its answers' tool calls are read by tools.PARSERS["deepseek_v32"].)

The format, as DeepSeek documents it for V3.2:
  * system: its content; with tools, a "## Tools" block after a blank line that shows the call syntax and lists
    the functions' JSON schemas inside <functions> ... </functions>;
  * user: <｜User｜>CONTENT<｜Assistant｜>, then <think> when it is the last user turn in thinking mode, else
    </think> (the answer starts after the reasoning, which it then does not have);
  * assistant: [REASONING</think> if it answers the last user turn in thinking mode] CONTENT [a tool-call block]
    <｜end▁of▁sentence｜>; a tool-call block is "\\n\\n<｜DSML｜function_calls>\\n", one invoke per call
    (<｜DSML｜invoke name="NAME">, one <｜DSML｜parameter name="KEY" string="true|false">VALUE</｜DSML｜parameter>
    per argument, lines joined by newlines, </｜DSML｜invoke>), then "\\n</｜DSML｜function_calls>"; string
    values are written as they are (string="true"), others as JSON (string="false");
  * tool results after an assistant's calls: "\\n\\n<function_results>", "\\n<result>CONTENT</result>" per
    result, "\\n</function_results>\\n\\n" and <think> (thinking mode, after the last user turn) or </think>.
Tools given with the request (OpenAI's `tools`) go into the system turn (one is added when there is none).
"""
from __future__ import annotations

import json

from dsv3_jax.cli import UserError
from dsv3_jax.serve.tools import CALLS_BEGIN, CALLS_END, INVOKE_END, PARAM_END, D

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"


def _tools_block(tools: list[dict]) -> str:
    schemas = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
    return (f"## Tools\n\nYou have access to a set of tools you can use to answer the user's question.\n"
            f"You can invoke functions by writing a \"{CALLS_BEGIN}\" block like the following as part of your "
            f"reply to the user:\n{CALLS_BEGIN}\n<{D}invoke name=\"$FUNCTION_NAME\">\n"
            f"<{D}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE{PARAM_END}\n...\n"
            f"{INVOKE_END}\n<{D}invoke name=\"$FUNCTION_NAME2\">\n...\n{INVOKE_END}\n{CALLS_END}\n\n"
            f"String and scalar parameters should be specified as is without any escaping or quotes, while lists "
            f"and objects should use JSON format. The \"string\" attribute should be set to \"true\" for string "
            f"type parameters and \"false\" for other types (numbers, booleans, arrays, objects).\n\n"
            f"If the thinking_mode is enabled, then after function results you should strongly consider outputting "
            f"a thinking block. Here is an example:\n\n{CALLS_BEGIN}\n...\n{CALLS_END}\n\n<function_results>\n...\n"
            f"</function_results>\n\n{THINK}...thinking about results{END_THINK}\n\n"
            f"Here are the functions available in JSONSchema format:\n<functions>\n{schemas}\n</functions>\n")


def _calls_block(tool_calls: list[dict]) -> str:
    invokes = []
    for tc in tool_calls:
        f = tc.get("function", tc)
        args = f.get("arguments") or "{}"
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise UserError(f"messages: tool call {f.get('name')!r} has arguments that are not JSON",
                            field="messages") from None
        params = [f'<{D}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                  f'{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}{PARAM_END}'
                  for k, v in (args.items() if isinstance(args, dict) else ())]
        invokes.append(f'<{D}invoke name="{f.get("name", "")}">\n' + "\n".join(params) + f"\n{INVOKE_END}")
    return f"\n\n{CALLS_BEGIN}\n" + "\n".join(invokes) + f"\n{CALLS_END}"


def encode_v32(messages: list[dict], tools: list[dict] | None = None, thinking: bool = False) -> str:
    """The V3.2 prompt of an OpenAI conversation (see the module docstring)."""
    messages = [dict(m) for m in messages]
    if tools:
        if messages and messages[0].get("role") == "system":
            messages[0]["tools"] = tools
        else:
            messages.insert(0, {"role": "system", "content": "", "tools": tools})
    last_user = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)
    out = [BOS]
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        if role == "system":
            out.append(content + (("\n\n" + _tools_block(m["tools"])) if m.get("tools") else ""))
        elif role in ("user", "developer"):
            out.append(f"{USER}{content}{ASSISTANT}" + (THINK if thinking and i == last_user else END_THINK))
        elif role == "assistant":
            lead = ""
            if thinking and i > last_user:
                lead = (m.get("reasoning_content") or "") + END_THINK
            calls = _calls_block(m["tool_calls"]) if m.get("tool_calls") else ""
            out.append(f"{lead}{content}{calls}{EOS}")
        elif role == "tool":
            j = i - 1
            while j >= 0 and messages[j].get("role") == "tool":
                j -= 1
            n_calls = len(messages[j].get("tool_calls") or ()) if j >= 0 and messages[j].get("role") == \
                "assistant" else 0
            order = i - j
            if order > n_calls:
                raise UserError(f"messages[{i}]: a tool result with no assistant tool call to answer",
                                field="messages")
            out.append(("\n\n<function_results>" if order == 1 else "") + f"\n<result>{content}</result>")
            if order == n_calls:
                out.append("\n</function_results>\n\n" + (THINK if thinking and i >= last_user else END_THINK))
        else:
            raise UserError(f"messages[{i}]: unknown role {role!r} (system, user, developer, assistant, tool)",
                            field="messages")
    return "".join(out)
