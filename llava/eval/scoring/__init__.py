"""Benchmark scorers: one small module per benchmark, each scoring answer files as LLaVA's own scripts do.

Every module has `NAME`, `add_arguments(parser)`, `score_from_args(args) -> dict`,
`format_metrics(metrics) -> str`, `headline(metrics) -> (metric, value, maximum)` (the number a
results table shows) and `main(argv) -> int`, and imports neither torch nor the model, so scoring
starts instantly. Judged benchmarks also set `NEEDS_JUDGE = True`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from llava.errors import InputError

# benchmark name (as `llava eval score NAME` and suite files spell it) -> module under llava.eval.scoring
SCORERS = {
    "pope": "pope", "science_qa": "science_qa", "mme": "mme", "seed": "seed", "mmbench": "mmbench",
    "textvqa": "textvqa", "vqav2": "vqav2", "vizwiz": "vizwiz", "gqa": "gqa",
    "llava_bench": "llava_bench", "mm_vet": "mm_vet",
}


def scorer(name: str) -> ModuleType:
    """The scoring module of a benchmark, or an InputError listing the known names."""
    if name not in SCORERS:
        raise InputError(f"unknown benchmark {name!r}; known: {', '.join(sorted(SCORERS))}")
    return importlib.import_module(f"llava.eval.scoring.{SCORERS[name]}")
