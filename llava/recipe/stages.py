"""What a restarted recipe may keep: a stage-0 model made with the same spec, and a training stage
finished with the same config and data (or resumed from a checkpoint of the same config); plus each
training stage's trainer config and its shell equivalent."""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import asdict, is_dataclass, replace
from typing import Any

from llava.dataclass_cli import saved_value, to_argv
from llava.recipe.common import read_json
from llava.recipe.sizes import RecipeSize
from llava.train.config import TrainConfig

# the spec fields each stage-0 model depends on: a restarted run keeps the model only if they are unchanged
_DATA_FIELDS = ("n", "vocab", "text_chats", "text_mc", "max_objects", "world")
_STAGE0_FIELDS: dict[str, tuple[str, ...]] = {
    "stage0_tokenizer": _DATA_FIELDS,
    "stage0_vision": _DATA_FIELDS + ("vision", "vision_steps", "vision_batch", "vision_lr", "vision_scenes",
                                     "vision_negatives", "grounding_weight", "order_weight", "vision_mix_scenes",
                                     "centre_weight", "word_weight"),
    "stage0_lm": _DATA_FIELDS + ("lm", "lm_steps", "lm_batch", "lm_scenes"),
}
_STAGE0_FIELDS["stage0_vision_hires"] = _STAGE0_FIELDS["stage0_vision"] + ("vision_hires_size", "vision_hires_steps",
                                                                           "vision_hires_lr")


STAGE0_SPEC_FILE = "recipe_spec.json"  # beside each stage-0 model: the recipe spec it was made with
MADE_IN_SECONDS = "made_in_seconds"  # and, in the same record, its wall time (not a spec field)


def stage0_spec(folder: str, earlier_spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The spec a stage-0 model in `folder` was made with: its own record, else the spec of the last
    run that finished (older runs wrote no record), else None (trust the folder)."""
    path = os.path.join(folder, STAGE0_SPEC_FILE)
    return read_json(path) if os.path.isfile(path) else earlier_spec


def same_stage0_spec(name: str, earlier: dict[str, Any] | None, spec: RecipeSize) -> bool:
    """Whether the run that wrote `earlier` (its summary's spec) made stage-0 model `name` as `spec` would.
    Fields an older summary lacks count as their default, in the nested specs too (VisionSpec,
    LMSpec). No earlier summary: trust the folder."""
    if earlier is None:
        return True
    now = json.loads(json.dumps(asdict(spec)))

    def then(k: str) -> Any:
        nested = getattr(spec, k)
        value = saved_value(RecipeSize, earlier, k, nested=type(nested) if is_dataclass(nested) else None)
        return json.loads(json.dumps(value))

    same = all(then(k) == now[k] for k in _STAGE0_FIELDS[name])
    if name.startswith("stage0_vision"):  # the second world's scenes: its own field, else the mixed phase's world
        same = same and (then("vision_mix_world") or then("s2_mix_world")) == spec.tower_mix_world
    return same


# where and how a run ran, not what it learnt: a finished run may be reused whatever these were
_RUN_ONLY_KEYS = frozenset({"out", "overwrite", "progress", "resume", "device", "save_steps", "save_total_limit"})


def train_config(stage: str, out: str, data: str, image_folder: str, epochs: int, batch: int, lr: float, seed: int,
                  max_steps: int | None, template: str | None = None, unfreeze_vision_tower: bool = False,
                  vision_tower_lr: float | None = None, device: str = "cpu", save_steps: int = 0,
                  image_aspect_ratio: str | None = None, length_window: int = 1, bf16: bool = False,
                  image_grid_pinpoints: list[tuple[int, int]] | None = None, image_size: int | None = None,
                  **model: str) -> TrainConfig:
    """One `llava train` run as the trainer's own config."""
    return TrainConfig(stage=stage, data=data, out=out, image_folder=image_folder, learning_rate=lr, epochs=epochs,
                       max_steps=max_steps, micro_batch_size=batch, grad_accum=1, warmup_ratio=0.03,
                       lr_scheduler="cosine", model_max_length=512, gradient_checkpointing=False, seed=seed,
                       device=device, progress=False, logging_steps=5, overwrite=True, template=template,
                       save_steps=save_steps, save_total_limit=1, image_aspect_ratio=image_aspect_ratio,
                       image_grid_pinpoints=image_grid_pinpoints, image_size=image_size,
                       unfreeze_vision_tower=unfreeze_vision_tower, vision_tower_lr=vision_tower_lr,
                       length_window=length_window, bf16=bf16, **model)


def use_bf16(flag: bool | None, device: str) -> bool:
    """Whether stage 2 trains under bf16 autocast: as asked, else where bf16 is native (on a CPU
    with AVX512_BF16 or AMX stage 2 trains ~1.4x faster). `llava train` itself defaults to bf16 on
    GPUs only, so the recipe decides and says so in each stage's command."""
    if flag is not None:
        return flag
    import torch

    from llava.train.loop import bf16_is_native

    return bf16_is_native(torch.device(device))


def train_stage(cfg: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train (from checkpoint folder `resume` when given); the finished stage keeps no checkpoints."""
    from llava.train import checkpointing as ckpt
    from llava.train.loop import train

    result = train(replace(cfg, resume=resume) if resume else cfg)
    for _, folder in ckpt.complete_checkpoints(cfg.out):  # the model folder is what ships
        ckpt.discard(folder)
    return {"steps": result.global_step, "final_loss": result.final_loss, "seconds": result.wall_time_s,
            **({"resumed_from": os.path.basename(resume)} if resume else {})}


def _same_run(state: dict[str, Any], cfg: TrainConfig, root: str) -> bool:
    """Whether a trainer state (a finished run's or a checkpoint's) is of this very config and data.

    Paths inside the run folder `root` compare relative to it, so a moved or copied run folder
    restarts too."""
    from llava.train.checkpointing import sha256_file

    saved = state.get("config", {})
    rel, saved_out = os.path.relpath(cfg.out, root), str(saved.get("out", ""))
    old_root = saved_out[:-len(rel) - 1] if saved_out.endswith(os.sep + rel) else ""

    def moved(value: Any) -> Any:
        if old_root and isinstance(value, str) and value.startswith(old_root + os.sep):
            return root + value[len(old_root):]
        return value

    now = json.loads(json.dumps(cfg.resolved().to_dict()))  # as the trainer saved it: defaults filled in
    return (all(moved(saved_value(TrainConfig, saved, k)) == v for k, v in now.items() if k not in _RUN_ONLY_KEYS)
            and state.get("data_sha256") == sha256_file(cfg.data))


def finished_run(cfg: TrainConfig, root: str) -> dict[str, Any] | None:
    """What a finished run of this very config (same data file) left in `cfg.out`, else None.

    A restarted recipe keeps such a stage instead of training it again."""
    state_file = os.path.join(cfg.out, "trainer_state.json")
    if not (os.path.isfile(state_file) and os.path.isfile(os.path.join(cfg.out, "model.safetensors"))):
        return None
    state = read_json(state_file)
    if state.get("global_step") != state.get("total_steps") or not _same_run(state, cfg, root):
        return None
    return {"reused": True, "steps": state["global_step"], "final_loss": state["loss"],
            "seconds": state["wall_time_s"]}


def resumable_checkpoint(cfg: TrainConfig, root: str) -> str | None:
    """The latest checkpoint a killed run of this very config left in `cfg.out`, else None."""
    from llava.train import checkpointing as ckpt

    latest = ckpt.latest_checkpoint(cfg.out)
    return latest if latest and _same_run(ckpt.read_state(latest), cfg, root) else None


def train_command(device: str = "cpu", root: str | None = None, **args: Any) -> str:
    """The equivalent shell command (for the model card): `train_config`'s flags, derived from the
    config itself; where and how the run is kept (checkpoints, logging, progress) left out, and the
    device too where it is the CPU. Paths inside the run folder `root` read `$OUT/...`."""
    cfg = train_config(device=device, **args)
    skip = {"save_steps", "save_total_limit", "logging_steps", "progress", "overwrite"}
    if device == "cpu":
        skip.add("device")

    def word(token: str) -> str:
        if root and (token == root or token.startswith(root.rstrip(os.sep) + os.sep)):
            rest = token[len(root.rstrip(os.sep)):]
            return "$OUT" + rest if shlex.quote(rest) == rest or not rest else '"$OUT"' + shlex.quote(rest)
        return shlex.quote(token)

    return " ".join(["llava", "train", *map(word, to_argv(cfg, skip))])
