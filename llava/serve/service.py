"""One loaded model behind one scheduler: what the API, the web UI and a model worker share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llava.api import LlavaPipeline, default_model_path, load
from llava.generate.scheduler import Scheduler


def model_name_for(path: str | os.PathLike | None) -> str:
    """The name clients use for a model: its folder's name, or the last two parts for a
    `checkpoint-N` folder (as the original's model worker names them)."""
    parts = Path(str(path or default_model_path()).rstrip("/")).parts
    if len(parts) >= 2 and parts[-1].startswith("checkpoint-"):
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1] if parts else "llava"


@dataclass
class ModelService:
    """A pipeline (templates, image processing, tokenizer) and the scheduler that runs its model."""

    name: str
    pipe: LlavaPipeline
    scheduler: Scheduler

    @classmethod
    def load(cls, model: str | None = None, name: str | None = None, max_batch: int = 8, max_waiting: int = 64,
             **load_args) -> ModelService:
        pipe = load(model, **load_args)
        return cls(name or model_name_for(model), pipe, Scheduler(pipe.engine, max_batch, max_waiting))

    def close(self) -> None:
        self.scheduler.close()
