"""Projectors: map vision features into the language model's embedding space."""

from __future__ import annotations

import re

from torch import nn

from llava.config import validate_projector_type


def build_projector(projector_type: str, vision_hidden: int, text_hidden: int) -> nn.Module:
    """`linear`, `identity`, or `mlp<N>x_gelu` (N linear layers with exact-erf GELU between them).

    The MLP is an `nn.Sequential` so its parameter names (`0.weight`, `2.weight`, ...) are the
    original's `mm_projector.*` names; checkpoint tables map them to llava-hf's `linear_1/2`.
    """
    validate_projector_type(projector_type)
    if projector_type == "linear":
        return nn.Linear(vision_hidden, text_hidden)
    if projector_type == "identity":
        if vision_hidden != text_hidden:
            raise ValueError(f"identity projector needs equal sizes, got vision {vision_hidden} vs text {text_hidden}")
        return nn.Identity()
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", projector_type).group(1))
    layers: list[nn.Module] = [nn.Linear(vision_hidden, text_hidden)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(text_hidden, text_hidden)]
    return nn.Sequential(*layers)
