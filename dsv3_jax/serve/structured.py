"""Structured outputs: a grammar (a JSON schema, a regular expression, a choice of strings or a Lark grammar)
that every generated token must keep satisfiable, enforced by masking the sampler's logits.

    grammars = Grammars(tokenizer, vocab_size, eos_ids)      # once per server (building the token trie: ~1 s)
    g = grammars.make(request_spec)                          # a fresh Grammar per request (raises UserError)
    engine.submit(..., constraint=g)                         # the engine asks g.allowed() before each token
                                                             # and calls g.advance(token) after it

The grammar engine is llguidance (Microsoft's Rust library behind Guidance, also used by vLLM and SGLang): it
computes the mask of a 129k-token vocabulary in tens of microseconds from a token trie, takes JSON schemas,
regular expressions and Lark grammars directly, and needs no per-schema compilation step that would stall a
request (xgrammar compiles a schema first; outlines-core builds a full index). The engine applies the mask on
the device (sampling.penalize: disallowed tokens at -inf, before temperature, top-k, top-p and min-p), so
constrained and free rows share one step; a constrained row decodes one token per dispatch. Under MTP
speculation a verify step gets two masks per row, now and after its draft (the grammar advanced on a copy):
a draft the grammar refuses has probability 0 and is never accepted, so the output is what decoding without
speculation gives.

Request specs (OpenAI's and vLLM's forms):
    response_format {"type": "json_object"}                      any JSON object
    response_format {"type": "json_schema", "json_schema": {"schema": {...}, ...}}
    structured_outputs {"json": schema} | {"regex": str} | {"choice": [str, ...]} | {"grammar": lark}
JSON is held to json.dumps' layout (", " and ": ", no other whitespace) unless the spec says "any_whitespace":
true (a model allowed unbounded whitespace can spend its whole budget on it).
"""
from __future__ import annotations

import json
import re

import numpy as np

from dsv3_jax.cli import UserError


class Grammar:
    """One request's grammar state over llguidance's matcher."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def allowed(self) -> np.ndarray:
        """[V] bool: the tokens that keep the output within the grammar (EOS once it may end)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        if mask.size < self.vocab_size:  # (ids past the tokenizer's vocabulary: never allowed)
            mask = np.concatenate([mask, np.zeros(self.vocab_size - mask.size, bool)])
        return mask

    def copy(self) -> Grammar:
        return Grammar(self.matcher.deep_copy(), self.vocab_size)

    def advance(self, token: int) -> bool:
        return bool(self.matcher.consume_token(int(token))) and not self.matcher.is_error()

    @property
    def done(self) -> bool:
        """Nothing may follow (the grammar is complete and admits no continuation)."""
        return bool(self.matcher.is_stopped())


class AfterReasoning:
    """A grammar that starts after the model's reasoning: every token is free until `end_id` (`</think>`) is
    generated, then `grammar` holds (a thinking model under response_format thinks first, then answers in the
    format). The engine sees the same interface as `Grammar`."""

    def __init__(self, grammar: Grammar, end_id: int, thinking: bool = True):
        self.grammar, self.end_id, self.thinking = grammar, end_id, thinking

    def allowed(self) -> np.ndarray:
        return np.ones(self.grammar.vocab_size, bool) if self.thinking else self.grammar.allowed()

    def copy(self) -> AfterReasoning:
        return AfterReasoning(self.grammar.copy(), self.end_id, self.thinking)

    def advance(self, token: int) -> bool:
        if self.thinking:
            self.thinking = int(token) != self.end_id
            return True
        return self.grammar.advance(token)

    @property
    def done(self) -> bool:
        return not self.thinking and self.grammar.done


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        import llguidance

        self.llg, self.vocab_size = llguidance, vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))

    def grammar_text(self, spec: dict, field: str) -> str:
        """llguidance's grammar for a request's spec (see the module docstring); UserError naming `field`."""
        M = self.llg.LLMatcher
        kind = spec.get("type")
        # JSON as json.dumps writes it (", " and ": ", no other whitespace) unless the request asks for any: a model
        # allowed unbounded whitespace can spend its whole budget on it (DeepSeek's own API warns of this).
        style = None if spec.get("any_whitespace") else {"whitespace_flexible": False, "item_separator": ", ",
                                                         "key_separator": ": "}
        try:
            if kind == "json_object":
                return M.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=style)
            if kind == "json_schema":
                schema = (spec.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise UserError(f"{field}: json_schema needs a 'schema' object", field=field)
                return M.grammar_from_json_schema(json.dumps(schema), defaults=style)
            if "json" in spec:
                schema = spec["json"]
                return M.grammar_from_json_schema(schema if isinstance(schema, str) else json.dumps(schema),
                                                  defaults=style)
            if "regex" in spec:
                return M.grammar_from_regex(spec["regex"])
            if "choice" in spec:
                choices = spec["choice"]
                if not choices or not all(isinstance(c, str) for c in choices):
                    raise UserError(f"{field}: choice needs a list of strings", field=field)
                return M.grammar_from_regex("|".join(re.escape(c) for c in choices))
            if "grammar" in spec:
                return M.grammar_from_lark(spec["grammar"])
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 (llguidance's refusal of a schema or grammar: the client's error)
            raise UserError(f"{field}: {type(e).__name__}: {e}", field=field) from None
        raise UserError(f"{field}: give type json_object or json_schema, or one of json, regex, choice, grammar",
                        field=field)

    def make(self, spec: dict, field: str = "response_format") -> Grammar:
        matcher = self.llg.LLMatcher(self.tokenizer, self.grammar_text(spec, field), log_level=0)
        if matcher.is_error():
            raise UserError(f"{field}: the grammar does not compile: {matcher.get_error()}", field=field)
        return Grammar(matcher, self.vocab_size)
