"""The training loop: one loop for every stage and every number of processes.

Per optimizer step the loop takes the next global batch of the epoch's seeded order
(`sampler.epoch_batches`), keeps this process's share (`Strategy.shard`), loads all of its
micro-batches, and counts the target tokens of the *whole* global batch
(`Strategy.all_reduce_sum`). Each micro-batch's loss is its sum of token losses divided by
that count (times the world size, cancelling DDP/FSDP's gradient averaging), so the
gradient is that of the global batch's mean token loss however it is split over
processes and accumulation steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from llava.dataclass_cli import saved_value
from llava.errors import CheckpointMismatch, CheckpointNotFound, DeviceError, InputError, LlavaError
from llava.processing.labels import IGNORE_INDEX
from llava.train import checkpointing as ckpt
from llava.train.build import Built, build_model, make_scheduler, param_groups, prepare_for_stage
from llava.train.config import RESUME_MUST_MATCH, TrainConfig
from llava.train.data import SupervisedDataset, collate, read_rows, refuse_bad_rows, unpad_rows, worker_error
from llava.train.progress import Progress, truncate_metrics
from llava.train.sampler import epoch_batches, micro_batches, steps_per_epoch
from llava.train.strategy import Strategy, make_strategy


@dataclass
class TrainResult:
    out: str
    global_step: int
    final_loss: float | None
    wall_time_s: float
    model: torch.nn.Module  # the trained model (unwrapped; LoRA still unmerged), for callers in-process
    state: dict[str, Any] = field(default_factory=dict)  # what trainer_state.json holds


def train(cfg: TrainConfig, strategy: Strategy | None = None) -> TrainResult:
    """Run (or resume) a training run described by `cfg` and write its outputs to `cfg.out`."""
    with _config_errors():
        cfg = cfg.resolved()
    # What the user can get wrong in the data file or the output path fails now, not after the model loads.
    ckpt.check_output_dir(cfg.out)
    records = read_rows(cfg.data)
    refuse_bad_rows(records, cfg.data)
    owned = strategy is None
    strategy = strategy or make_strategy(cfg.strategy, cfg.device)
    try:
        return _Run(cfg, strategy, records).run()
    finally:
        if owned:
            strategy.close()


@contextmanager
def _config_errors() -> Iterator[None]:
    """A `ValueError` of `TrainConfig`'s checks is a flag the user set wrong: an `InputError` (exit 2)."""
    try:
        yield
    except ValueError as err:
        if isinstance(err, LlavaError):
            raise
        raise InputError(str(err)) from err


def bf16_is_native(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a GPU with bf16, a CPU whose oneDNN has bf16
    instructions (AVX512_BF16 or AMX; elsewhere a CPU emulates bf16, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        from llava.model.onednn import native_bf16

        return native_bf16()
    return False


def _use_bf16(flag: bool | None, device: torch.device) -> bool:
    cuda_bf16 = device.type == "cuda" and bf16_is_native(device)
    if flag is None:
        return cuda_bf16
    if flag and device.type == "cuda" and not cuda_bf16:
        raise DeviceError("this GPU has no bf16 support; drop --bf16 (fp32 is used)")
    return bool(flag)


UNPADDED_MIN_HIDDEN = 512


def _use_unpadded(flag: bool | None, device: torch.device, hidden_size: int) -> bool:
    """Whether to run each row of a micro-batch alone, cut to its own length.

    On a CPU a matmul over one row's few hundred tokens already runs as fast per token as over
    a batch (measured on the 200M benchmark model: 4 equal rows batched 19.3 s, one by one
    18.9 s), so padding is pure waste there: 4 rows of 300-420 tokens took 18.5 s padded and
    14.8 s unpadded. Small models are bound by per-call overhead instead, and GPUs need the
    batch to fill, so the default keeps padded batches for those.
    """
    if flag is None:
        return device.type == "cpu" and hidden_size >= UNPADDED_MIN_HIDDEN
    return bool(flag)


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token is a target in some row of the micro-batch.

    Only these go through the LM head (`logits_to_keep`): image, prompt and padding positions
    would cost a [tokens x vocabulary] product and its backward for nothing (~10% of a step of
    the 200M benchmark model with its 32k vocabulary). It is one index list for the whole
    micro-batch, so a row can carry positions that are targets only in another row; their
    labels are ignored like any other non-target.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


class _StepPlan:
    """This process's micro-batches, step after step, from `start` on (a DataLoader batch sampler)."""

    def __init__(self, n_rows: int, global_batch: int, micro: int, seed: int, per_epoch: int,
                 lengths: list[int] | None, strategy: Strategy, start: int, total: int,
                 length_window: int = 1) -> None:
        self.args = (n_rows, global_batch, seed)
        self.length_window = length_window
        self.micro, self.per_epoch, self.lengths = micro, per_epoch, lengths
        self.strategy, self.start, self.total = strategy, start, total
        self._epoch: tuple[int, list[list[int]]] | None = None

    def step(self, step: int) -> list[list[int]]:
        epoch, k = divmod(step, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            n_rows, global_batch, seed = self.args
            self._epoch = (epoch, epoch_batches(n_rows, global_batch, seed, epoch, self.lengths, self.length_window))
        return micro_batches(self.strategy.shard(self._epoch[1][k]), self.micro)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield from self.step(step)


class _Run:
    def __init__(self, cfg: TrainConfig, strategy: Strategy, records: list | None = None) -> None:
        self.cfg, self.strategy = cfg, strategy
        self.records = records if records is not None else read_rows(cfg.data)
        self.main = strategy.is_main
        self.device = strategy.device
        self.bf16 = _use_bf16(cfg.bf16, self.device)
        with _config_errors():
            self.micro, self.accum, self.global_batch = cfg.batch_plan(strategy.world_size)

    # Setup ----------------------------------------------------------------------------------------
    def _resume_dir(self) -> str | None:
        cfg, out = self.cfg, self.cfg.out
        if self.main:
            ckpt.make_output_dir(out)
        existing = ckpt.complete_checkpoints(out)
        if cfg.resume is None:
            if (existing or os.path.isfile(os.path.join(out, "trainer_state.json"))) and not cfg.overwrite:
                where = existing[-1][1] if existing else out
                raise InputError(f"{out} already holds a run ({where}); pass --resume to continue it or "
                                 "--overwrite to start over")
            if cfg.overwrite and self.main:
                for _, folder in existing:
                    ckpt.discard(folder)
                for name in ("metrics.jsonl", "trainer_state.json"):
                    if os.path.exists(os.path.join(out, name)):
                        os.remove(os.path.join(out, name))
            self.strategy.barrier()
            return None
        if self.main:
            removed = ckpt.remove_incomplete(out)
            if removed:
                print(f"[llava train] removed incomplete checkpoint(s): {', '.join(removed)}", file=sys.stderr)
        self.strategy.barrier()
        if cfg.resume != "auto":
            if not os.path.isfile(os.path.join(cfg.resume, ckpt.COMPLETE)):
                raise CheckpointNotFound(f"--resume {cfg.resume}: not a complete checkpoint folder")
            return cfg.resume
        latest = ckpt.latest_checkpoint(out)
        if latest is None and self.main:
            print(f"[llava train] --resume: no checkpoint in {out}; starting from step 0", file=sys.stderr)
        return latest

    def _check_resumable(self, state: dict[str, Any], folder: str) -> None:
        saved = state["config"]
        now = json.loads(json.dumps(self.cfg.to_dict()))  # tuples -> lists, as saved
        then = {k: saved_value(TrainConfig, saved, k) for k in RESUME_MUST_MATCH}
        diffs = [f"{k}: checkpoint {then[k]!r}, now {now[k]!r}" for k in RESUME_MUST_MATCH if then[k] != now[k]]
        if state.get("data_sha256") != self.data_hash:
            diffs.append(f"data file {self.cfg.data} changed (sha256 {self.data_hash[:12]}..., "
                         f"checkpoint {str(state.get('data_sha256'))[:12]}...)")
        if state.get("global_batch") != self.global_batch:
            diffs.append(f"global batch: checkpoint {state.get('global_batch')}, now {self.global_batch}")
        if diffs:
            raise CheckpointMismatch(f"cannot resume from {folder}: the run differs from the one that wrote it: "
                                     + "; ".join(diffs))

    def _setup(self) -> None:
        cfg, strategy = self.cfg, self.strategy
        resume_dir = self._resume_dir()
        self.built: Built = build_model(cfg)
        model = self.built.model
        self.unpadded = _use_unpadded(cfg.unpadded, self.device, model.config.text_config.hidden_size)
        compute = torch.bfloat16 if self.bf16 else torch.float32
        self.trainable = prepare_for_stage(model, cfg, compute_dtype=compute)
        self.dataset = SupervisedDataset(
            self.records, self.built.tokenizer, model.config.template,
            image_token_index=model.config.image_token_index,
            image_token_count=model.image_token_count, image_processor=self.built.image_processor,
            image_folder=cfg.image_folder, convention=self.built.convention, max_length=cfg.model_max_length)
        if self.dataset.template.name == "plain":
            refuse_bad_rows(self.records, cfg.data, plain=True)
        self.lengths = self.dataset.modality_lengths if cfg.group_by_modality_length else None
        self.per_epoch = steps_per_epoch(len(self.dataset), self.global_batch, self.lengths)
        self.total = cfg.max_steps or self.per_epoch * cfg.epochs
        self.data_hash = ckpt.sha256_file(cfg.data)
        self.resumed: dict[str, Any] | None = None
        if resume_dir:
            self.resumed = ckpt.read_state(resume_dir)
            self._check_resumable(self.resumed, resume_dir)
            weights = ckpt.read_trainable(resume_dir)
            missing = sorted(set(self.trainable) - set(weights))
            if missing:
                raise CheckpointMismatch(f"{resume_dir} lacks trainable weights {missing[:5]}")
            model.load_state_dict(weights, strict=False)
        self.wrapped = strategy.wrap(model)
        module = strategy.unwrap(self.wrapped)
        # The fused kernel updates all parameters in one pass (~0.2 s instead of ~0.9 s per step for the
        # 200M benchmark model on a CPU); FSDP2's sharded DTensors keep the default implementation.
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") and strategy.name != "fsdp" else {}
        self.optimizer = torch.optim.AdamW(param_groups(module, cfg), lr=cfg.learning_rate, betas=cfg.adam_betas,
                                           eps=cfg.adam_eps, **fused)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_scheduler, math.ceil(self.total * cfg.warmup_ratio),
                                        self.total)
        self.start, self.prior_seconds = 0, 0.0
        if self.resumed:
            opt_state, sched_state = ckpt.read_optimizer(resume_dir)
            strategy.load_optimizer_state_dict(self.wrapped, self.optimizer, opt_state)
            self.scheduler.load_state_dict(sched_state)
            self.start = int(self.resumed["global_step"])
            self.prior_seconds = float(self.resumed.get("wall_time_s", 0.0))
            rng = ckpt.read_rng(resume_dir, strategy.rank)
            if rng is None:
                print(f"[llava train] {resume_dir} has no RNG state for rank {strategy.rank}; dropout will differ "
                      "from an uninterrupted run", file=sys.stderr)
            else:
                ckpt.set_rng_state(rng)
        else:
            seed = cfg.seed + strategy.rank  # dropout masks differ per process, like per-row randomness
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        if self.main:  # a killed run's lines past the resumed step (or all, from step 0) go
            truncate_metrics(cfg.out, self.start)

    # Steps ----------------------------------------------------------------------------------------
    def _loader(self, plan: _StepPlan) -> Iterator[dict[str, Any]]:
        pad = self.built.tokenizer.pad_token_id
        if self.cfg.num_workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Its own generator: creating the loader must not draw from the global RNG (resume = same dropout).
        loader = DataLoader(self.dataset, batch_sampler=plan, collate_fn=partial(collate, pad_token_id=pad),
                            num_workers=self.cfg.num_workers, generator=torch.Generator().manual_seed(0))
        return iter(loader)

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        d = self.device
        return dict(input_ids=batch["input_ids"].to(d), attention_mask=batch["attention_mask"].to(d),
                    pixel_values=[p.to(d) for p in batch["pixel_values"]], image_sizes=batch["image_sizes"])

    def _step(self, batches: list[dict[str, Any]]) -> tuple[float, float, float]:
        """One optimizer step over this process's micro-batches; (loss, grad norm, tokens in the global batch)."""
        world = self.strategy.world_size
        local = torch.tensor([sum(float((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
                              sum(float(b["attention_mask"].sum()) for b in batches)],
                             dtype=torch.float64, device=self.device)
        n_targets, n_tokens = self.strategy.all_reduce_sum(local).tolist()
        scale = world / max(n_targets, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.unpadded:
            batches = [row for batch in batches for row in unpad_rows(batch)]
        for i, batch in enumerate(batches):
            # Positions and targets from the host copy of the labels: `nonzero` on a GPU would wait for it.
            keep = predicting_positions(batch["labels"])
            targets = batch["labels"][:, keep + 1].to(self.device)
            keep = keep.to(self.device)
            with self.strategy.gradient_sync(self.wrapped, sync=i == len(batches) - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    logits = self.wrapped(**self._to_device(batch), use_cache=False, logits_to_keep=keep).logits
                if logits.shape[1] != keep.numel():  # a language model that ignores logits_to_keep
                    logits = logits[:, keep]
                token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
                (token_loss * scale).backward()
            loss_sum += token_loss.detach().double()
        # A step without images leaves the projector without a gradient. Give it a zero one, as the
        # original does (its text-only rows carry a blank image) and FSDP2 does: AdamW's momentum then
        # moves it the same way whatever the strategy, instead of skipping it in one process only.
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(self.strategy.clip_grad_norm(self.wrapped, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(self.strategy.all_reduce_sum(loss_sum)) / max(n_targets, 1.0)
        return loss, grad_norm, n_tokens

    def _save_checkpoint(self, step: int, loss: float, seconds: float) -> None:
        """Collective: every process writes its RNG state; the main one the rest, then publishes."""
        strategy, out = self.strategy, self.cfg.out
        trainable = self._trainable_state()
        opt_state = strategy.optimizer_state_dict(self.wrapped, self.optimizer)
        tmp = ckpt.tmp_checkpoint_dir(out, step)
        if self.main:
            ckpt.remove_incomplete(out)
            os.makedirs(tmp)
        strategy.barrier()
        ckpt.write_rng(tmp, strategy.rank)
        if self.main:
            state = self._state(step, loss, seconds)
            ckpt.write_checkpoint_files(tmp, trainable, opt_state,
                                        self.scheduler.state_dict(), state)
        strategy.barrier()
        if self.main:
            ckpt.publish_checkpoint(out, step, self.cfg.save_total_limit)
        strategy.barrier()

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights, complete on the main process (a sharded strategy gathers them)."""
        if type(self.strategy).full_state_dict is Strategy.full_state_dict:  # one process: no full copy
            params = dict(self.strategy.unwrap(self.wrapped).named_parameters())
            return {k: params[k].detach().cpu() for k in self.trainable}
        full = self.strategy.full_state_dict(self.wrapped)
        return {k: full[k] for k in self.trainable} if self.main else {}

    def _state(self, step: int, loss: float | None, seconds: float) -> dict[str, Any]:
        return {
            "stage": self.cfg.stage, "global_step": step, "total_steps": self.total,
            "epoch": step / self.per_epoch, "steps_per_epoch": self.per_epoch, "seed": self.cfg.seed,
            "loss": loss, "wall_time_s": seconds, "data": os.path.abspath(self.cfg.data),
            "data_sha256": self.data_hash, "rows": len(self.dataset), "world_size": self.strategy.world_size,
            "strategy": self.strategy.name, "micro_batch": self.micro, "grad_accum": self.accum,
            "global_batch": self.global_batch, "bf16": self.bf16, "unpadded": self.unpadded,
            "config": self.cfg.to_dict(),
            "versions": ckpt.library_versions(),
        }

    # The loop -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t_start = time.perf_counter()
        self._setup()
        cfg = self.cfg
        plan = _StepPlan(len(self.dataset), self.global_batch, self.micro, cfg.seed, self.per_epoch, self.lengths,
                         self.strategy, self.start, self.total, cfg.length_window)
        batches = self._loader(plan)
        progress = Progress(cfg.out, self.total, self.start, cfg.logging_steps, enabled=self.main,
                            show_bar=cfg.progress, report_to=tuple(cfg.report_to), run_config=cfg.to_dict())
        if self.main and self.start:
            progress.message(f"[llava train] resumed at step {self.start}/{self.total}")
        loss = self.resumed.get("loss") if self.resumed else None
        self.wrapped.train()
        try:
            for step in range(self.start, self.total):
                t0 = time.perf_counter()
                try:
                    micro = [next(batches) for _ in plan.step(step)]
                except LlavaError as err:  # a bad row: its own message, not a DataLoader worker's traceback
                    raise worker_error(err) from None
                loss, grad_norm, tokens = self._step(micro)
                if cfg.step_delay:
                    time.sleep(cfg.step_delay)
                seconds = time.perf_counter() - t0
                done = step + 1
                progress.step(done, done / self.per_epoch, loss, self.scheduler.get_last_lr()[0], grad_norm,
                              self.global_batch, int(tokens), seconds)
                if cfg.save_steps and done % cfg.save_steps == 0 and done < self.total:
                    self._save_checkpoint(done, loss, self.prior_seconds + time.perf_counter() - t_start)
        finally:
            progress.close()
        wall = self.prior_seconds + time.perf_counter() - t_start
        state = self._state(self.total, loss, wall)
        self._write_outputs(state)
        return TrainResult(cfg.out, self.total, loss, wall, self.strategy.unwrap(self.wrapped), state)

    def _write_outputs(self, state: dict[str, Any]) -> None:
        full = self.strategy.full_state_dict(self.wrapped)
        if self.main:
            model, built, out = self.built.model, self.built, self.cfg.out
            model.config.text_config.use_cache = True  # training turned it off; inference wants it
            if built.save_layout == "lora":
                grew = model.input_embeddings().weight.shape[0] != built.base_vocab
                ckpt.write_lora(model, full, self.trainable, built.tokenizer, built.image_processor, out,
                                source=built.source, include_tower=self.cfg.unfreeze_vision_tower
                                or not built.tower_is_stock, include_embeddings=grew)
            else:
                ckpt.write_full(model, full, built.tokenizer, built.image_processor, out, built.save_layout)
                if self.cfg.stage == "pretrain":
                    ckpt.write_projector(full, out)
            state["output_layout"] = "original-lora" if built.save_layout == "lora" else built.save_layout
            ckpt.write_json(os.path.join(out, "trainer_state.json"), state)
        self.strategy.barrier()
