"""The reasoning split: a thinking model's `<think> ... </think>` text goes to `reasoning_content`, the rest to
`content` (DeepSeek-R1; V3.1 and V3.2 in thinking mode), streamed or not.

    split = ReasoningSplit(open_at_start=prompt_ends_inside_think)
    reasoning, content = split.whole(text)                  # a finished answer
    d_reasoning, d_content = split.push(text_so_far)        # streaming: the new text of each part

The opening tag may be the template's (R1's and V3.1's thinking templates end the prompt with `<think>`): then
the answer starts inside the reasoning (`open_at_start`). Otherwise an answer that starts with `<think>` opens it.
Without `</think>` an open reasoning runs to the end of the text (an answer cut by max_tokens while thinking).
Streaming holds back text that may be the start of a tag, so no chunk carries half a tag in either part.
"""
from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves the answer inside a `<think>` the template wrote."""
    tail = prompt_text.rstrip()
    return tail.endswith(OPEN)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (0 if none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningSplit:
    def __init__(self, open_at_start: bool = False):
        self.open_at_start = open_at_start
        self.sent = ("", "")

    def whole(self, text: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, content) of `text`; not final: as far as it can be told (a partial tag held back)."""
        inside = self.open_at_start
        body = text
        if not inside:
            lead = text.lstrip()
            if lead.startswith(OPEN):
                inside, body = True, lead[len(OPEN):]
            elif not final and OPEN.startswith(lead):  # may become "<think>": nothing to say yet
                return "", ""
        if not inside:
            return "", text
        end = body.find(CLOSE)
        if end < 0:
            hold = 0 if final else _partial_tag(body, CLOSE)
            return body[:len(body) - hold], ""
        return body[:end], body[end + len(CLOSE):]

    def push(self, text: str, final: bool = False) -> tuple[str, str]:
        """The new (reasoning, content) text since the last push, given the whole text so far."""
        reasoning, content = self.whole(text, final)
        old_r, old_c = self.sent
        d_r = reasoning[len(old_r):] if reasoning.startswith(old_r) else ""
        d_c = content[len(old_c):] if content.startswith(old_c) else ""
        self.sent = (old_r + d_r, old_c + d_c)
        return d_r, d_c
