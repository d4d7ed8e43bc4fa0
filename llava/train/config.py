"""Training configuration: one dataclass, and the stages as data.

A stage names what learns and where the result goes; its hyperparameters are the LLaVA-1.5
recipe (upstream scripts/v1_5/{pretrain,finetune,finetune_lora}.sh, 8 GPUs). Any field set
explicitly wins over the stage's value; `TrainConfig.resolved()` fills the rest in one
place, so the loop never asks which stage it is running except through `Stage`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llava.config import ASPECT_RATIOS, MERGE_TYPES, validate_projector_type

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
REPORTERS = ("none", "tensorboard", "wandb")
SAVE_LAYOUTS = ("auto", "hf", "original")


@dataclass(frozen=True)
class Stage:
    """What a stage trains, how it saves, and its recipe values (filled in where a field is None)."""

    name: str
    trains: tuple[str, ...]  # of: projector, image_newline, language_model, lora
    output: str  # "hf" (+ projector files for pretrain) or "lora" (the original LoRA layout)
    quantize: str | None = None  # "bnb-4bit" for QLoRA
    template: str | None = None  # None: the model's own template, else vicuna_v1 (the original's --version v1)
    recipe: dict[str, Any] = field(default_factory=dict)


_COMMON = dict(weight_decay=0.0, warmup_ratio=0.03, lr_scheduler="cosine", epochs=1, model_max_length=2048,
               gradient_checkpointing=True)
STAGES: dict[str, Stage] = {
    "pretrain": Stage("pretrain", trains=("projector",), output="hf", template="plain",
                      recipe=dict(_COMMON, learning_rate=1e-3, global_batch_size=256, micro_batch_size=32,
                                  group_by_modality_length=False, image_aspect_ratio="square")),
    "finetune": Stage("finetune", trains=("language_model", "projector", "image_newline"), output="hf",
                      recipe=dict(_COMMON, learning_rate=2e-5, global_batch_size=128, micro_batch_size=16,
                                  group_by_modality_length=True, image_aspect_ratio="pad")),
    "lora": Stage("lora", trains=("lora", "projector", "image_newline"), output="lora",
                  recipe=dict(_COMMON, learning_rate=2e-4, mm_projector_lr=2e-5, lora_r=128, lora_alpha=256,
                              global_batch_size=128, micro_batch_size=16, group_by_modality_length=True,
                              image_aspect_ratio="pad")),
}
STAGES["qlora"] = dataclasses.replace(STAGES["lora"], name="qlora", quantize="bnb-4bit")


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown training stage {name!r}; valid: {', '.join(STAGES)}") from None


@dataclass
class TrainConfig:
    """Everything a run needs. None means "the stage's recipe value" (see `resolved`)."""

    stage: str
    data: str  # LLaVA JSON / JSONL
    out: str
    image_folder: str | None = None

    # Where the model comes from: an existing LLaVA checkpoint, or an LM + a vision tower.
    model: str | None = None
    model_base: str | None = None  # when `model` is a LoRA or projector-only checkpoint
    language_model: str | None = None
    vision_tower: str | None = None
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2
    vision_feature_select: str = "patch"
    image_aspect_ratio: str | None = None  # fresh builds only; a checkpoint keeps its own
    mm_patch_merge_type: str | None = None  # fresh builds: flat, or spatial_unpad with anyres
    image_grid_pinpoints: list[tuple[int, int]] | None = None  # (width, height), anyres
    pretrain_mm_mlp_adapter: str | None = None  # stage-1 projector (mm_projector.bin or projector.safetensors)
    template: str | None = None
    convention: str | None = None  # <image> tokenization; default: that of the output layout

    # What learns.
    unfreeze_vision_tower: bool = False  # LLaVA-1.6 style, with vision_tower_lr
    freeze_projector: bool = False  # the original's --freeze_mm_mlp_adapter
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS

    # Optimisation.
    learning_rate: float | None = None
    mm_projector_lr: float | None = None  # None: the main learning rate
    vision_tower_lr: float | None = None  # None: the main learning rate
    weight_decay: float | None = None
    warmup_ratio: float | None = None
    lr_scheduler: str | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0: no clipping
    epochs: int | None = None
    max_steps: int | None = None  # overrides epochs
    micro_batch_size: int | None = None  # rows per forward pass per process
    grad_accum: int | None = None  # forward passes per optimizer step per process
    global_batch_size: int | None = None  # rows per optimizer step, all processes
    model_max_length: int | None = None
    group_by_modality_length: bool | None = None
    # with it, rows are sorted by length across this many global batches, not only within each (sampler)
    length_window: int = 1
    gradient_checkpointing: bool | None = None
    bf16: bool | None = None  # None: bf16 autocast where the device supports it (CUDA), fp32 elsewhere
    unpadded: bool | None = None  # one forward per row, no padding; None: on CPU for LMs >= 512 wide (loop.py)
    seed: int = 42

    # Running and outputs.
    strategy: str = "auto"
    device: str | None = None
    num_workers: int = 0
    save_steps: int = 0  # 0: no periodic checkpoints
    save_total_limit: int | None = None
    save_layout: str = "auto"  # full-model stages: hf, original, or auto (hf where it can hold the model)
    logging_steps: int = 1
    report_to: tuple[str, ...] = ()
    resume: str | None = None  # "auto": latest complete checkpoint in out; or a checkpoint folder
    overwrite: bool = False  # start over even though `out` holds checkpoints
    progress: bool = True
    step_delay: float = 0.0  # seconds slept per step: lets tests kill a run mid-way

    @property
    def stage_spec(self) -> Stage:
        return get_stage(self.stage)

    def resolved(self) -> "TrainConfig":
        """A copy with every None recipe field set from the stage, validated."""
        stage = get_stage(self.stage)
        values = {k: v for k, v in stage.recipe.items() if getattr(self, k) is None}
        if self.grad_accum is not None:  # an explicit accumulation fixes the global batch with the micro batch
            values.pop("global_batch_size", None)
        cfg = dataclasses.replace(self, **values)
        if cfg.template is None and stage.template is not None:
            cfg.template = stage.template
        if cfg.grad_accum is None and cfg.global_batch_size is None:
            cfg.grad_accum = 1
        if cfg.mm_patch_merge_type is None:
            cfg.mm_patch_merge_type = "spatial_unpad" if cfg.image_aspect_ratio == "anyres" else "flat"
        cfg.validate()
        return cfg

    def batch_plan(self, world_size: int) -> tuple[int, int, int]:
        """(micro batch, accumulation steps, global batch) for `world_size` processes."""
        micro = int(self.micro_batch_size or 1)
        per_step = micro * world_size
        if self.grad_accum is None and self.global_batch_size is not None:
            if self.global_batch_size % per_step:
                raise ValueError(f"global batch {self.global_batch_size} is not a multiple of micro batch {micro} x "
                                 f"{world_size} process(es); change --global-batch-size or --micro-batch-size")
            return micro, self.global_batch_size // per_step, self.global_batch_size
        accum = int(self.grad_accum or 1)
        if self.global_batch_size is not None and self.global_batch_size != per_step * accum:
            raise ValueError(f"global batch {self.global_batch_size} != micro batch {micro} x accumulation {accum} x "
                             f"{world_size} process(es); pass only two of them")
        return micro, accum, per_step * accum

    def validate(self) -> None:
        stage = get_stage(self.stage)
        if not self.data:
            raise ValueError("--data is required")
        if not self.out:
            raise ValueError("--out is required")
        if self.model and self.language_model:
            raise ValueError("pass either --model (an existing LLaVA checkpoint) or --language-model + "
                             "--vision-tower (a fresh LLaVA), not both")
        if not self.model and not (self.language_model and self.vision_tower):
            raise ValueError("no model: pass --model CHECKPOINT, or --language-model LM_FOLDER and "
                             "--vision-tower CLIP_FOLDER to build a fresh LLaVA")
        validate_projector_type(self.projector_type)
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"unknown image aspect ratio {self.image_aspect_ratio!r}; valid: {ASPECT_RATIOS}")
        if self.mm_patch_merge_type not in MERGE_TYPES:
            raise ValueError(f"unknown patch merge type {self.mm_patch_merge_type!r}; valid: {MERGE_TYPES}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.lr_scheduler!r}; valid: {', '.join(SCHEDULERS)}")
        for name in self.report_to:
            if name not in REPORTERS:
                raise ValueError(f"unknown --report-to {name!r}; valid: {', '.join(REPORTERS)}")
        if self.save_layout not in SAVE_LAYOUTS:
            raise ValueError(f"unknown save layout {self.save_layout!r}; valid: {', '.join(SAVE_LAYOUTS)}")
        if "lora" in stage.trains and not self.lora_targets:
            raise ValueError("LoRA needs at least one target module name")
        for name in ("micro_batch_size", "grad_accum", "global_batch_size", "epochs", "max_steps", "lora_r",
                     "model_max_length", "logging_steps", "length_window"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.save_steps < 0:
            raise ValueError(f"save_steps must be >= 0, got {self.save_steps}")
        if self.learning_rate is None or self.learning_rate <= 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def saved_value(cls, saved: dict[str, Any], key: str) -> Any:
        """`key` of a saved config, or its default where the config predates the field."""
        if key in saved:
            return saved[key]
        field = {f.name: f for f in dataclasses.fields(cls)}.get(key)
        return None if field is None or field.default is dataclasses.MISSING else field.default

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        return cls(**data)


# Fields that must agree between a run and the checkpoint it resumes from: they decide the
# data order, the schedule or the shapes of what was saved.
RESUME_MUST_MATCH = ("stage", "seed", "global_batch_size", "micro_batch_size", "grad_accum", "epochs", "max_steps",
                     "group_by_modality_length", "length_window", "learning_rate", "mm_projector_lr", "vision_tower_lr",
                     "lr_scheduler", "warmup_ratio", "lora_r", "lora_alpha", "lora_targets", "unfreeze_vision_tower",
                     "freeze_projector", "projector_type", "template", "model_max_length")
