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


_MODEL, _LEARNS, _OPTIM, _RUN = ("model", "what trains", "optimisation (defaults: the stage's LLaVA-1.5 recipe)",
                                  "running and saving")


def _flag(default: Any = dataclasses.MISSING, *, group: str | None = None, **meta: Any) -> Any:
    """A TrainConfig field and its `llava train` flag (llava.dataclass_cli): help, aliases (flags), group, ..."""
    return field(default=default, metadata={"group": group, **meta})


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _reporters(text: str) -> tuple[str, ...]:
    return tuple(r for r in _names(text) if r != "none")


def _betas(text: str) -> tuple[float, float]:
    first, second = (float(b) for b in _names(text))
    return first, second


def _pinpoints(text: str) -> list[tuple[int, int]]:
    from llava.processing.anyres import parse_pinpoints

    return parse_pinpoints(text)


@dataclass
class TrainConfig:
    """Everything a run needs. None means "the stage's recipe value" (see `resolved`)."""

    stage: str = _flag(help="pretrain: projector only (stage 1); finetune: LM + projector (stage 2); "
                            "lora / qlora: LoRA adapters on the LM (4-bit base for qlora) + projector",
                       choices=list(STAGES))
    data: str = _flag(help="LLaVA JSON / JSONL conversation records")
    out: str = _flag(flags=["--output-dir"], help="output folder")
    image_folder: str | None = _flag(None, help="folder the records' image paths are relative to")

    # Where the model comes from: an existing LLaVA checkpoint, or an LM + a vision tower.
    model: str | None = _flag(None, group=_MODEL, help="existing LLaVA checkpoint to continue from (any layout)")
    model_base: str | None = _flag(None, group=_MODEL,
                                   help="base LM, when --model is a LoRA or projector-only checkpoint")
    language_model: str | None = _flag(None, group=_MODEL,
                                       help="plain causal LM folder (with tokenizer) for a fresh LLaVA")
    vision_tower: str | None = _flag(None, group=_MODEL,
                                     help="CLIP/SigLIP folder for a fresh LLaVA; with --model, the tower "
                                          "that replaces its own (same kind, width and depth)")
    projector_type: str = _flag("mlp2x_gelu", group=_MODEL, help="linear, mlp<N>x_gelu")
    vision_feature_layer: int = _flag(-2, flags=["--mm-vision-select-layer"], group=_MODEL,
                                      help="tower layer the projector reads")
    vision_feature_select: str = _flag("patch", group=_MODEL, choices=["patch", "cls_patch"])
    image_aspect_ratio: str | None = _flag(None, group=_MODEL, choices=list(ASPECT_RATIOS),
                                           help="default: a fresh model square for pretrain, pad otherwise; a --model "
                                                "checkpoint keeps its own (square <-> pad switch it)")
    image_size: int | None = _flag(None, group=_MODEL,
                                   help="train the vision tower at this input side in pixels (its position "
                                        "embeddings resampled to the larger or smaller patch grid); default: its own")
    mm_patch_merge_type: str | None = _flag(None, group=_MODEL, choices=list(MERGE_TYPES),
                                            help="fresh builds: flat, or spatial_unpad with anyres")
    image_grid_pinpoints: list[tuple[int, int]] | None = _flag(
        None, group=_MODEL, parse=_pinpoints,
        help="anyres grids as [[w, h], ...] (default: 1.6's grids in units of the tower's size)")
    pretrain_mm_mlp_adapter: str | None = _flag(None, group=_MODEL,
                                                help="stage-1 projector: mm_projector.bin, projector.safetensors "
                                                     "or their folder")
    template: str | None = _flag(None, flags=["--version"], group=_MODEL,
                                 help="conversation template (default: plain for pretrain, else the model's or "
                                      "vicuna_v1)")
    convention: str | None = _flag(None, group=_MODEL, choices=["hf", "original"],
                                   help="how <image> is tokenised (default: what the output layout's loader uses)")

    # What learns.
    unfreeze_vision_tower: bool = _flag(False, group=_LEARNS, help="train the tower too (LLaVA-1.6)")
    freeze_projector: bool = _flag(False, group=_LEARNS,
                                   help="keep the projector fixed in finetune/lora (the original's "
                                        "--freeze_mm_mlp_adapter)")
    lora_r: int | None = _flag(None, group=_LEARNS, help="LoRA rank (recipe: 128)")
    lora_alpha: int | None = _flag(None, group=_LEARNS, help="LoRA alpha (recipe: 256)")
    lora_dropout: float = _flag(0.05, group=_LEARNS)
    lora_targets: tuple[str, ...] = _flag(LORA_TARGETS, group=_LEARNS, parse=_names,
                                          help="comma-separated linear layer names")

    # Optimisation.
    learning_rate: float | None = _flag(None, flags=["--lr"], group=_OPTIM)
    mm_projector_lr: float | None = _flag(None, group=_OPTIM, help="projector learning rate (lora recipe: 2e-5)")
    vision_tower_lr: float | None = _flag(None, group=_OPTIM, help="tower learning rate when unfrozen")
    weight_decay: float | None = _flag(None, group=_OPTIM)
    warmup_ratio: float | None = _flag(None, group=_OPTIM)
    lr_scheduler: str | None = _flag(None, group=_OPTIM, choices=list(SCHEDULERS))
    adam_betas: tuple[float, float] = _flag((0.9, 0.999), group=_OPTIM, parse=_betas, help="AdamW's two betas")
    adam_eps: float = _flag(1e-8, group=_OPTIM)
    max_grad_norm: float = _flag(1.0, group=_OPTIM, help="gradient clipping (<= 0: off)")
    epochs: int | None = _flag(None, group=_OPTIM)
    max_steps: int | None = _flag(None, group=_OPTIM, help="stop after N optimizer steps (overrides --epochs)")
    micro_batch_size: int | None = _flag(None, flags=["--batch-size"], group=_OPTIM,
                                         help="rows per forward pass per process")
    grad_accum: int | None = _flag(None, flags=["--gradient-accumulation-steps"], group=_OPTIM,
                                   help="forward passes per optimizer step per process")
    global_batch_size: int | None = _flag(None, group=_OPTIM,
                                          help="rows per optimizer step over all processes (sets the accumulation)")
    model_max_length: int | None = _flag(None, group=_OPTIM)
    group_by_modality_length: bool | None = _flag(None, group=_OPTIM, help="single-modality, length-grouped steps")
    length_window: int = _flag(1, group=_OPTIM,
                               help="with --group-by-modality-length: sort rows by length across N global batches, "
                                    "so a batch pads less (1: within each batch, as the original)")
    gradient_checkpointing: bool | None = _flag(None, group=_OPTIM, help="recompute activations in backward")
    bf16: bool | None = _flag(None, group=_OPTIM, help="bf16 autocast (default: on where the GPU has it)")
    unpadded: bool | None = _flag(None, group=_OPTIM,
                                  help="run each row of a micro batch alone, unpadded (default: on CPU for language "
                                       "models at least 512 wide)")
    seed: int = _flag(42, group=_OPTIM)

    # Running and outputs.
    strategy: str = _flag("auto", group=_RUN, choices=["auto", "single", "ddp", "fsdp"],
                          help="auto: DDP under torchrun with several processes, else one process")
    device: str | None = _flag(None, group=_RUN, help="cpu, cuda, mps (default: best available)")
    num_workers: int = _flag(0, group=_RUN, help="data loading worker processes")
    save_steps: int = _flag(0, group=_RUN, help="checkpoint every N steps (0: only the final model)")
    save_total_limit: int | None = _flag(None, group=_RUN, help="keep only the newest N checkpoints")
    save_layout: str = _flag("auto", group=_RUN, choices=list(SAVE_LAYOUTS),
                             help="full-model outputs: llava-hf, the original layout, or auto (hf unless it cannot)")
    logging_steps: int = _flag(1, group=_RUN)
    report_to: tuple[str, ...] = _flag((), group=_RUN, parse=_reporters,
                                       help=f"comma-separated: {', '.join(REPORTERS)}")
    resume: str | None = _flag(None, group=_RUN, nargs="?", const="auto",
                               help="continue from the latest complete checkpoint in --out (or the given checkpoint "
                                    "folder)")
    overwrite: bool = _flag(False, group=_RUN, help="start over even if --out holds a run")
    progress: bool = _flag(True, group=_RUN, help="a progress bar")
    step_delay: float = _flag(0.0, hidden=True)  # seconds slept per step: lets tests kill a run mid-way

    @property
    def stage_spec(self) -> Stage:
        return get_stage(self.stage)

    def resolved(self) -> "TrainConfig":
        """A copy with every None recipe field set from the stage, validated."""
        stage = get_stage(self.stage)
        values = {k: v for k, v in stage.recipe.items() if getattr(self, k) is None}
        if self.model:  # a checkpoint keeps its own aspect mode unless one is asked for
            values.pop("image_aspect_ratio", None)
        if self.grad_accum is not None:  # an explicit accumulation fixes the global batch with the micro batch
            values.pop("global_batch_size", None)
        cfg = dataclasses.replace(self, **values)
        if cfg.template is None and stage.template is not None:
            cfg.template = stage.template
        if cfg.grad_accum is None and cfg.global_batch_size is None:
            cfg.grad_accum = 1
        if cfg.mm_patch_merge_type is None and not cfg.model:
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
        fresh = not self.model  # a checkpoint's own aspect and merge type stand where these are None
        if self.image_aspect_ratio not in ASPECT_RATIOS and (fresh or self.image_aspect_ratio is not None):
            raise ValueError(f"unknown image aspect ratio {self.image_aspect_ratio!r}; valid: {ASPECT_RATIOS}")
        if self.mm_patch_merge_type not in MERGE_TYPES and (fresh or self.mm_patch_merge_type is not None):
            raise ValueError(f"unknown patch merge type {self.mm_patch_merge_type!r}; valid: {MERGE_TYPES}")
        if fresh and self.image_grid_pinpoints and self.image_aspect_ratio != "anyres":
            raise ValueError(f"--image-grid-pinpoints are anyres's grids; this build is {self.image_aspect_ratio} "
                             "(add --image-aspect-ratio anyres)")
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
