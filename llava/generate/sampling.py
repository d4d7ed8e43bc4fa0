"""Next-token choice from last-position logits, done on the logits' device.

Everything stays a tensor op (no `.item()`, no Python loops over the vocabulary) so the only
host sync per decode step is the one the engine does to read the chosen ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from llava.errors import InputError, InputTypeError

MIN_TEMPERATURE = 1e-5  # below: greedy (the limit of sampling as T -> 0)
MAX_TEMPERATURE = 1e4  # above: the same as 1e4 (already uniform to float precision)


@dataclass
class SamplingParams:
    """How to choose tokens and when to stop.

    temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off. `stop`
    strings end a row when they appear in its text (the stop string itself is trimmed);
    `seed` makes sampling reproducible for the same batch of requests. `ignore_eos` keeps
    going past the end-of-sequence token until `max_new_tokens` or a stop string (as vLLM's
    option of that name: fixed-length answers for benchmarks and load tests).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.temperature = _number("temperature", self.temperature)
        self.top_p = _number("top_p", self.top_p)
        self.top_k = _integer("top_k", self.top_k)
        self.max_new_tokens = _integer("max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
            if not -(2**63) <= self.seed < 2**64:
                raise InputError(f"seed must fit in 64 bits, got {self.seed}")
        self.stop = _stop_strings(self.stop)
        if not isinstance(self.ignore_eos, bool):
            raise InputTypeError(f"ignore_eos must be true or false, not {type(self.ignore_eos).__name__}")

    @property
    def greedy(self) -> bool:
        """Temperatures below MIN_TEMPERATURE are argmax: dividing fp32 logits by them overflows."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def _number(name: str, value: object) -> float:
    """A finite real number (bools and strings are refused: they are always a caller's mistake)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"{name} must be a number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    return value


def _integer(name: str, value: object) -> int:
    """An int; a float with an integral value (e.g. 128.0 from JSON) is accepted as that int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an integer, not {type(value).__name__} ({value!r:.40})")
    return value


def _stop_strings(stop: object) -> tuple[str, ...]:
    """`stop` as a tuple of non-empty strings; a lone string is one stop string, not one per character."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InputTypeError(f"stop must be a string or a list of strings, not {type(stop).__name__} ({stop!r:.60})")
    return tuple(s for s in stop if s)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A private RNG for one generate call, so a seed does not depend on (or disturb) global RNG state."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set every logit outside the top-k / nucleus (top-p) set to -inf; [B, V] float in, same out."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the best one always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        drop[:, 0] = False  # a top_p below float32's smallest value would otherwise drop every token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of [B, V] logits, as a [B] long tensor on the logits' device."""
    if params.greedy:
        return logits.argmax(dim=-1)
    # Shift the best logit to 0 first: a tiny temperature then sends the rest to -inf, never to inf/NaN.
    logits = logits.float()
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / min(params.temperature, MAX_TEMPERATURE)
    probs = filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
