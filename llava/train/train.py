"""`python -m llava.train.train`: the original's training flags (scripts/v1_5/*.sh), mapped onto ours.

    python -m llava.train.train --model_name_or_path lmsys/vicuna-7b-v1.5 --version plain \\
        --data_path blip_laion_cc_sbu_558k.json --image_folder images \\
        --vision_tower openai/clip-vit-large-patch14-336 --mm_projector_type mlp2x_gelu \\
        --tune_mm_mlp_adapter True --output_dir ./checkpoints/pretrain ...

Omitted flags take the original's defaults (transformers 4.37 TrainingArguments and
upstream's dataclasses: lr 5e-5, 3 epochs, batch 8, lora_r 64, model_max_length 512, ...),
so a script behaves as it did upstream. `--tune_mm_mlp_adapter True` selects the pretrain
stage, `--lora_enable True` lora, `--bits 4` qlora, otherwise finetune. DeepSpeed-only
flags are accepted and print one line saying what is done instead; like upstream, a run
resumes by itself when `--output_dir` holds a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from llava.errors import CheckpointError, InputError
from llava.train.config import TrainConfig

# Flags accepted for compatibility, with what happens instead (printed when given).
NOTES = {
    "deepspeed": None,  # depends on the file: see _deepspeed_note
    "tf32": "TF32 matmuls are switched on for CUDA as asked; no effect on CPU",
    "lazy_preprocess": "data is always tokenised lazily, row by row",
    "evaluation_strategy": "no evaluation during training; run `llava eval` on the output",
    "save_strategy": "checkpoints are written every --save_steps steps",
    "fp16": "fp16 training is not supported (it needs loss scaling); use --bf16 True, else fp32 is used",
    "freeze_backbone": "use --tune_mm_mlp_adapter True (pretrain) to train only the projector",
    "optim": "the optimizer is always AdamW (torch)",
    "mm_use_im_patch_token": "<im_patch> is never used in prompts; ignored",
    "lora_bias": "LoRA biases are not trained (bias='none')",
    "lora_weight_path": "not supported; ignored",
    "double_quant": "QLoRA always uses nf4 with double quantization",
    "quant_type": "QLoRA always uses nf4 with double quantization",
}
QUIET = ("cache_dir", "mpt_attn_impl", "remove_unused_columns", "run_name", "per_device_eval_batch_size",
         "local_rank", "dataloader_pin_memory", "ddp_find_unused_parameters", "disable_tqdm")


def _bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.train.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = dict(type=_bool, nargs="?", const=True)
    add = p.add_argument
    # ModelArguments
    add("--model_name_or_path", required=True)
    add("--version", default="v0")
    add("--freeze_backbone", default=False, **flag)
    add("--tune_mm_mlp_adapter", default=False, **flag)
    add("--vision_tower", default=None)
    add("--mm_vision_select_layer", type=int, default=-1)
    add("--pretrain_mm_mlp_adapter", default=None)
    add("--mm_projector_type", default="linear")
    add("--mm_use_im_start_end", default=False, **flag)
    add("--mm_use_im_patch_token", default=False, **flag)
    add("--mm_patch_merge_type", default=None)  # the original's default is flat; None lets a checkpoint keep its own
    add("--mm_vision_select_feature", default="patch")
    add("--unfreeze_mm_vision_tower", default=False, **flag)
    add("--mm_vision_tower_lr", type=float, default=None)
    add("--image_grid_pinpoints", default=None)
    # DataArguments
    add("--data_path", required=True)
    add("--lazy_preprocess", default=None, **flag)
    add("--is_multimodal", default=None, **flag)
    add("--image_folder", default=None)
    add("--image_aspect_ratio", default=None)  # the original's default is square; None lets a checkpoint keep its own
    # TrainingArguments
    add("--output_dir", required=True)
    add("--num_train_epochs", type=float, default=3.0)
    add("--max_steps", type=int, default=-1)
    add("--per_device_train_batch_size", type=int, default=8)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--learning_rate", type=float, default=5e-5)
    add("--weight_decay", type=float, default=0.0)
    add("--warmup_ratio", type=float, default=0.0)
    add("--lr_scheduler_type", default="linear")
    add("--max_grad_norm", type=float, default=1.0)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--model_max_length", type=int, default=512)
    add("--gradient_checkpointing", default=False, **flag)
    add("--bf16", default=False, **flag)
    add("--fp16", default=None, **flag)
    add("--tf32", default=None, **flag)
    add("--group_by_modality_length", default=False, **flag)
    add("--freeze_mm_mlp_adapter", default=False, **flag)
    add("--lora_enable", default=False, **flag)
    add("--lora_r", type=int, default=64)
    add("--lora_alpha", type=int, default=16)
    add("--lora_dropout", type=float, default=0.05)
    add("--lora_weight_path", default=None)
    add("--lora_bias", default=None)
    add("--bits", type=int, default=16)
    add("--double_quant", default=None, **flag)
    add("--quant_type", default=None)
    add("--mm_projector_lr", type=float, default=None)
    add("--save_steps", type=int, default=500)
    add("--save_total_limit", type=int, default=None)
    add("--save_strategy", default=None)
    add("--evaluation_strategy", "--eval_strategy", dest="evaluation_strategy", default=None)
    add("--logging_steps", type=int, default=500)
    add("--report_to", default="none")
    add("--dataloader_num_workers", type=int, default=0)
    add("--seed", type=int, default=42)
    add("--deepspeed", default=None)
    add("--optim", default=None)
    for name in QUIET:
        add(f"--{name}", default=None, help=argparse.SUPPRESS)
    # Ours, for launching the same command under torchrun
    add("--strategy", choices=["auto", "single", "ddp", "fsdp"], default="auto")
    add("--device", default=None)
    return p


def _deepspeed_note(path: str) -> str:
    sharded = "zero3" in os.path.basename(path).lower()
    how = "--strategy fsdp (parameters, gradients and optimizer state sharded)" if sharded else \
        "--strategy ddp (or --strategy fsdp to shard optimizer state too)"
    return f"DeepSpeed is not used; run torchrun --nproc_per_node N -m llava.train.train ... {how}"


def _is_llava_checkpoint(path: str) -> bool:
    from llava.checkpoint import detect_layout

    try:
        detect_layout(path)
        return True
    except (FileNotFoundError, CheckpointError):  # a plain LM folder: a fresh LLaVA is built from it
        return False


def config_from_original(argv: Sequence[str] | None = None) -> tuple[TrainConfig, list[str]]:
    """Our TrainConfig for the original's flags, and the notes to print about flags we handle differently."""
    args = build_parser().parse_args(argv)
    given = {a.split("=", 1)[0].lstrip("-") for a in (argv if argv is not None else sys.argv[1:])
             if a.startswith("--")}
    notes = [f"--{name} {getattr(args, name)}: {_deepspeed_note(args.deepspeed) if name == 'deepspeed' else text}"
             for name, text in NOTES.items() if name in given and getattr(args, name) not in (None, False)]
    if args.mm_use_im_start_end:
        raise InputError("--mm_use_im_start_end True is not supported (LLaVA-1.5/1.6 train with False)")
    if args.bits not in (4, 16):
        raise InputError(f"--bits {args.bits}: only 4 (QLoRA, nf4) or 16 are supported")
    if args.bits == 4 and not args.lora_enable:
        raise InputError("--bits 4 needs --lora_enable True (QLoRA)")
    if args.num_train_epochs != int(args.num_train_epochs) or args.num_train_epochs < 1:
        raise InputError(f"--num_train_epochs {args.num_train_epochs}: only whole epochs are supported "
                         "(use --max_steps for part of one)")
    stage = ("pretrain" if args.tune_mm_mlp_adapter else
             ("qlora" if args.bits == 4 else "lora") if args.lora_enable else "finetune")
    from llava.processing.templates import TEMPLATES

    template = args.version
    if template not in TEMPLATES:
        notes.append(f"--version {template}: unknown conversation template; using vicuna_v1 as the original does")
        template = "vicuna_v1"
    existing = _is_llava_checkpoint(args.model_name_or_path) if os.path.isdir(args.model_name_or_path) else False
    if not existing and not args.vision_tower:
        raise InputError(f"{args.model_name_or_path} is not a LLaVA checkpoint, so --vision_tower is needed "
                         "to build one from it")
    from llava.train.checkpointing import latest_checkpoint

    report = tuple(r for r in str(args.report_to).split(",") if r and r not in ("none", "all"))
    pinpoints = None
    if args.image_grid_pinpoints:
        from llava.model.anyres import parse_pinpoints

        pinpoints = parse_pinpoints(args.image_grid_pinpoints)
    cfg = TrainConfig(
        stage=stage, data=args.data_path, out=args.output_dir, image_folder=args.image_folder,
        model=args.model_name_or_path if existing else None,
        language_model=None if existing else args.model_name_or_path, vision_tower=args.vision_tower,
        projector_type=args.mm_projector_type, vision_feature_layer=args.mm_vision_select_layer,
        vision_feature_select=args.mm_vision_select_feature,
        image_aspect_ratio=args.image_aspect_ratio if existing else args.image_aspect_ratio or "square",
        mm_patch_merge_type=args.mm_patch_merge_type if existing else args.mm_patch_merge_type or "flat",
        image_grid_pinpoints=pinpoints,
        pretrain_mm_mlp_adapter=args.pretrain_mm_mlp_adapter, template=template,
        unfreeze_vision_tower=bool(args.unfreeze_mm_vision_tower), freeze_projector=bool(args.freeze_mm_mlp_adapter),
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        learning_rate=args.learning_rate, mm_projector_lr=args.mm_projector_lr, vision_tower_lr=args.mm_vision_tower_lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, lr_scheduler=args.lr_scheduler_type,
        adam_betas=(args.adam_beta1, args.adam_beta2), adam_eps=args.adam_epsilon, max_grad_norm=args.max_grad_norm,
        epochs=int(args.num_train_epochs), max_steps=args.max_steps if args.max_steps > 0 else None,
        micro_batch_size=args.per_device_train_batch_size, grad_accum=args.gradient_accumulation_steps,
        model_max_length=args.model_max_length, group_by_modality_length=bool(args.group_by_modality_length),
        gradient_checkpointing=bool(args.gradient_checkpointing), bf16=bool(args.bf16), seed=args.seed,
        strategy=args.strategy, device=args.device, num_workers=args.dataloader_num_workers,
        save_steps=0 if args.save_strategy == "no" else args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, report_to=report,
        resume="auto" if latest_checkpoint(args.output_dir) else None, overwrite=True,
    )
    if args.tf32:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return cfg, notes


def main(argv: Sequence[str] | None = None) -> int:
    """The original's entry point; user errors print one line and exit 2, never a traceback."""
    from llava.console import run_command

    def command() -> int:
        from llava.train.loop import train

        cfg, notes = config_from_original(argv)
        for note in notes:
            print(note, file=sys.stderr)
        result = train(cfg)
        print(f"trained {result.global_step} steps; wrote {result.out}")
        return 0

    return run_command("llava.train.train", command)


if __name__ == "__main__":
    from llava.console import exit_with

    exit_with(main())
