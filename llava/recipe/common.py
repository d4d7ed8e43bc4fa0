"""Small helpers shared by the stage-0 trainers: seeding, schedules, JSONL logs."""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Any, Callable

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


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_losses(path: str | os.PathLike) -> list[float]:
    """The `loss` column of a metrics.jsonl (rows without one are skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if isinstance(row.get("loss"), (int, float)):
                out.append(float(row["loss"]))
    return out


def read_check(metrics_jsonl: str | os.PathLike, key: str) -> dict[str, float]:
    """The held-out check a stage-0 model logged last (empty if none): the tower's `binding` or
    `grounding`, the LM's `text_answers`."""
    with open(metrics_jsonl, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return next((r[key] for r in reversed(rows) if key in r), {})


def train_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, steps: int, batch_size: int,
               peak_lr: float, seed: int, log: JsonlLog, loss_of: Callable[[torch.Tensor], torch.Tensor],
               log_every: int = 10, after_step: Callable[[int], None] | None = None,
               t0: float | None = None) -> None:
    """The stage-0 loop: reshuffled epochs of row indices (seeded), cosine schedule with 5% warmup,
    clip at 1.0, a metrics row every `log_every` steps (seconds since `t0`); `loss_of(indices)` is the
    batch's loss."""
    t0 = time.perf_counter() if t0 is None else t0
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    batch_size = min(batch_size, n)
    for step in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, peak_lr, max(1, steps // 20))
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            log.write(step=step + 1, loss=round(loss.item(), 5), lr=opt.param_groups[0]["lr"],
                      seconds=round(time.perf_counter() - t0, 2))
        if after_step is not None:
            after_step(step + 1)
