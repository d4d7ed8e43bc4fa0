"""Run progress for people and programs: a progress bar, `metrics.jsonl`, optional reporters.

Only the main process reports. tqdm draws the bar when installed (else a plain line per
logged step); TensorBoard and wandb are used only when asked for with `--report-to` and
installed, and say so once when they are not.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def truncate_metrics(out: str, last_step: int) -> None:
    """Drop lines past `last_step` (a killed run's steps that the resumed run repeats)."""
    path = os.path.join(out, METRICS_FILE)
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut by the kill
    with open(path, "w") as f:
        f.writelines(kept)


class Progress:
    """Collects per-step numbers, logs every `logging_steps` steps, draws the bar."""

    def __init__(self, out: str, total_steps: int, start_step: int, logging_steps: int, enabled: bool,
                 show_bar: bool, report_to: tuple[str, ...] = (), run_config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.logging_steps = max(1, logging_steps)
        self.window: list[dict[str, float]] = []
        self.started = time.perf_counter()
        self.start_step = start_step
        self.bar = None
        self.metrics = None
        self.writers: list[Any] = []
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        self.metrics = open(os.path.join(out, METRICS_FILE), "a")
        if show_bar:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
            except ImportError:
                self.bar = None
        self.show_lines = show_bar and self.bar is None
        self.writers = _reporters(report_to, out, run_config or {})

    def step(self, step: int, epoch: float, loss: float, lr: float, grad_norm: float, samples: int, tokens: int,
             seconds: float) -> None:
        if not self.enabled:
            return
        self.window.append(dict(loss=loss, grad_norm=grad_norm, samples=samples, tokens=tokens, seconds=seconds))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples / max(seconds, 1e-9):.1f}")
        if step % self.logging_steps and step != self.total:
            return
        window, self.window = self.window, []
        secs = sum(w["seconds"] for w in window)
        record = {
            "step": step, "epoch": round(epoch, 4),
            "loss": sum(w["loss"] for w in window) / len(window),
            "lr": lr, "grad_norm": window[-1]["grad_norm"],
            "samples_per_s": sum(w["samples"] for w in window) / max(secs, 1e-9),
            "tokens_per_s": sum(w["tokens"] for w in window) / max(secs, 1e-9),
            "step_time_s": secs / len(window),
            "elapsed_s": time.perf_counter() - self.started,
        }
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for writer in self.writers:
            writer(record)
        if self.show_lines:
            done = step - self.start_step
            eta = (self.total - step) * record["elapsed_s"] / max(done, 1)
            print(f"step {step}/{self.total} loss {record['loss']:.4f} lr {lr:.2e} "
                  f"{record['samples_per_s']:.1f} samples/s eta {_eta(eta)}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        for writer in self.writers:
            close = getattr(writer, "close", None)
            if close:
                close()


def _reporters(names: tuple[str, ...], out: str, run_config: dict[str, Any]) -> list[Any]:
    writers: list[Any] = []
    for name in names:
        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("--report-to tensorboard: tensorboard is not installed (pip install tensorboard); "
                      "metrics go to metrics.jsonl only", file=sys.stderr)
                continue
            tb = SummaryWriter(os.path.join(out, "runs"))

            def write_tb(record: dict[str, Any], tb=tb) -> None:
                for key, value in record.items():
                    if key not in ("step", "epoch"):
                        tb.add_scalar(f"train/{key}", value, record["step"])

            write_tb.close = tb.close  # type: ignore[attr-defined]
            writers.append(write_tb)
        elif name == "wandb":
            try:
                import wandb
            except ImportError:
                print("--report-to wandb: wandb is not installed (pip install wandb); "
                      "metrics go to metrics.jsonl only", file=sys.stderr)
                continue
            run = wandb.init(config=run_config, dir=out)

            def write_wandb(record: dict[str, Any], run=run) -> None:
                run.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

            write_wandb.close = run.finish  # type: ignore[attr-defined]
            writers.append(write_wandb)
    return writers
