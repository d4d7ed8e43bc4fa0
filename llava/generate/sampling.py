"""Next-token choice from last-position logits, done on the logits' device.

Everything stays a tensor op (no `.item()`, no Python loops over the vocabulary) so the only
host sync per decode step is the one the engine does to read the chosen ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class SamplingParams:
    """How to choose tokens and when to stop.

    temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off. `stop`
    strings end a row when they appear in its text (the stop string itself is trimmed);
    `seed` makes sampling reproducible for the same batch of requests.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):  # a lone string would otherwise be read as one stop per character
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


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
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of [B, V] logits, as a [B] long tensor on the logits' device."""
    if params.greedy:
        return logits.argmax(dim=-1)
    scaled = logits.float() / params.temperature
    probs = filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
