"""A request's sampling settings, checked when built (`SamplingParams`). No JAX here: the command-line tools
check their sampling flags before they import it (infer.py answers a bad --temperature at once). What the
settings mean, and the compiled code that applies them, is `dsv3_jax.infer.sampling`."""
from __future__ import annotations

import dataclasses

from dsv3_jax.cli import UserError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off; seed for every random draw; min_p 0 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0  # subtracted once from the logit of every token the output holds
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # tokens of the prompt or output: positive logits / r, negative x r
    logit_bias: tuple = ()  # ((token id, bias added to its logit), ...)

    @property
    def penalized(self) -> bool:
        """Whether any of the logit transforms that need the request's tokens (`penalize`) is on."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UserError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 disables top-k)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p={self.top_p} must be in (0, 1] (1 disables top-p)")
        if not 0.0 <= self.min_p <= 1.0:
            raise UserError(f"min_p={self.min_p} must be in [0, 1] (0 disables min-p)")
        if not self.repetition_penalty > 0:
            raise UserError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 disables it)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
