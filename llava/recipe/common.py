"""Small helpers shared by the stage-0 trainers: seeding, schedules, JSONL logs."""

from __future__ import annotations

import json
import math
import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of the peak (the usual small-model schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class JsonlLog:
    """Append-only metrics log, one JSON object per line (the trainer's metrics.jsonl format)."""

    def __init__(self, path: str | os.PathLike) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = str(path)
        self.rows: list[dict[str, Any]] = []
        open(self.path, "w").close()

    def write(self, **row: Any) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_losses(path: str | os.PathLike) -> list[float]:
    """The `loss` column of a metrics.jsonl (rows without one are skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if isinstance(row.get("loss"), (int, float)):
                out.append(float(row["loss"]))
    return out
