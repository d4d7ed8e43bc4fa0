"""`llava train` and `python -m llava.train`: the same arguments, one TrainConfig.

Every recipe flag defaults to None, meaning "the stage's LLaVA-1.5 value"
(see `llava.train.config.STAGES`), so `--stage finetune` alone reproduces the v1.5 recipe
and any flag given overrides just that value.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from llava.train.config import LORA_TARGETS, REPORTERS, SCHEDULERS, STAGES, TrainConfig


def _pinpoints(text: str) -> list[tuple[int, int]]:
    from llava.model.anyres import parse_pinpoints

    return parse_pinpoints(text)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The training flags, on any parser (a `llava` subcommand or `python -m llava.train`)."""
    S = argparse.SUPPRESS
    p.add_argument("--stage", required=True, choices=list(STAGES),
                   help="pretrain: projector only (stage 1); finetune: LM + projector (stage 2); "
                        "lora / qlora: LoRA adapters on the LM (4-bit base for qlora) + projector")
    p.add_argument("--data", required=True, help="LLaVA JSON / JSONL conversation records")
    p.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--out", "--output-dir", dest="out", required=True, help="output folder")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="existing LLaVA checkpoint to continue from (any layout)")
    g.add_argument("--model-base", default=None, help="base LM, when --model is a LoRA or projector-only checkpoint")
    g.add_argument("--language-model", default=None, help="plain causal LM folder (with tokenizer) for a fresh LLaVA")
    g.add_argument("--vision-tower", default=None,
                   help="CLIP/SigLIP folder for a fresh LLaVA (or overriding --model's tower source)")
    g.add_argument("--projector-type", default="mlp2x_gelu", help="linear, mlp<N>x_gelu (default mlp2x_gelu)")
    g.add_argument("--vision-feature-layer", "--mm-vision-select-layer", dest="vision_feature_layer", type=int,
                   default=-2)
    g.add_argument("--vision-feature-select", choices=["patch", "cls_patch"], default="patch")
    g.add_argument("--image-aspect-ratio", choices=["pad", "square", "anyres"], default=None,
                   help="fresh models only (default: square for pretrain, pad otherwise)")
    g.add_argument("--mm-patch-merge-type", choices=["flat", "spatial", "spatial_unpad"], default=None)
    g.add_argument("--image-grid-pinpoints", type=_pinpoints, default=None,
                   help="anyres grids as [[w, h], ...] (default: 1.6's grids in units of the tower's size)")
    g.add_argument("--pretrain-mm-mlp-adapter", default=None,
                   help="stage-1 projector: mm_projector.bin, projector.safetensors or their folder")
    g.add_argument("--template", "--version", dest="template", default=None,
                   help="conversation template (default: plain for pretrain, else the model's or vicuna_v1)")
    g.add_argument("--convention", choices=["hf", "original"], default=None,
                   help="how <image> is tokenised (default: what the output layout's loader uses)")

    g = p.add_argument_group("what trains")
    g.add_argument("--unfreeze-vision-tower", action="store_true", help="train the tower too (LLaVA-1.6)")
    g.add_argument("--freeze-projector", action="store_true", help="keep the projector fixed in finetune/lora")
    g.add_argument("--lora-r", type=int, default=None, help="LoRA rank (recipe: 128)")
    g.add_argument("--lora-alpha", type=int, default=None, help="LoRA alpha (recipe: 256)")
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--lora-targets", default=",".join(LORA_TARGETS), help="comma-separated linear layer names")

    g = p.add_argument_group("optimisation (defaults: the stage's LLaVA-1.5 recipe)")
    g.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=None)
    g.add_argument("--mm-projector-lr", type=float, default=None, help="projector learning rate (lora recipe: 2e-5)")
    g.add_argument("--vision-tower-lr", type=float, default=None, help="tower learning rate when unfrozen")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--warmup-ratio", type=float, default=None)
    g.add_argument("--lr-scheduler", choices=SCHEDULERS, default=None)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (<= 0: off)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (overrides --epochs)")
    g.add_argument("--micro-batch-size", "--batch-size", dest="micro_batch_size", type=int, default=None,
                   help="rows per forward pass per process")
    g.add_argument("--grad-accum", "--gradient-accumulation-steps", dest="grad_accum", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="rows per optimizer step over all processes (sets the accumulation)")
    g.add_argument("--model-max-length", type=int, default=None)
    g.add_argument("--length-window", type=int, default=1,
                   help="with --group-by-modality-length: sort rows by length across N global batches, so a "
                        "batch pads less (1: within each batch, as the original)")
    bools = ((("--group-by-modality-length",), "group_by_modality_length", "single-modality, length-grouped steps"),
             (("--gradient-checkpointing",), "gradient_checkpointing", "recompute activations in backward"),
             (("--bf16",), "bf16", "bf16 autocast (default: on where the GPU has it)"),
             (("--unpadded",), "unpadded", "run each row of a micro batch alone, unpadded (default: on CPU "
              "for language models at least 512 wide)"))
    for flags, dest, text in bools:
        g.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
    g.add_argument("--seed", type=int, default=42)

    g = p.add_argument_group("running and saving")
    g.add_argument("--strategy", choices=["auto", "single", "ddp", "fsdp"], default="auto",
                   help="auto: DDP under torchrun with several processes, else one process")
    g.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    g.add_argument("--num-workers", type=int, default=0, help="data loading worker processes")
    g.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only the final model)")
    g.add_argument("--save-total-limit", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--save-layout", choices=["auto", "hf", "original"], default="auto",
                   help="full-model outputs: llava-hf, the original layout, or auto (hf unless it cannot)")
    g.add_argument("--logging-steps", type=int, default=1)
    g.add_argument("--report-to", default="none", help=f"comma-separated: {', '.join(REPORTERS)}")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest complete checkpoint in --out (or the given checkpoint folder)")
    g.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--step-delay", type=float, default=0.0, help=S)  # tests: slow steps down to kill a run


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    report = tuple(r.strip() for r in (args.report_to or "").split(",") if r.strip() and r.strip() != "none")
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return TrainConfig(
        stage=args.stage, data=args.data, out=args.out, image_folder=args.image_folder,
        model=args.model, model_base=args.model_base, language_model=args.language_model,
        vision_tower=args.vision_tower, projector_type=args.projector_type,
        vision_feature_layer=args.vision_feature_layer, vision_feature_select=args.vision_feature_select,
        image_aspect_ratio=args.image_aspect_ratio, mm_patch_merge_type=args.mm_patch_merge_type,
        image_grid_pinpoints=args.image_grid_pinpoints, pretrain_mm_mlp_adapter=args.pretrain_mm_mlp_adapter,
        template=args.template, convention=args.convention, unfreeze_vision_tower=args.unfreeze_vision_tower,
        freeze_projector=args.freeze_projector, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=targets, learning_rate=args.learning_rate,
        mm_projector_lr=args.mm_projector_lr, vision_tower_lr=args.vision_tower_lr, weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio, lr_scheduler=args.lr_scheduler, max_grad_norm=args.max_grad_norm,
        epochs=args.epochs, max_steps=args.max_steps, micro_batch_size=args.micro_batch_size,
        grad_accum=args.grad_accum, global_batch_size=args.global_batch_size, model_max_length=args.model_max_length,
        group_by_modality_length=args.group_by_modality_length, length_window=args.length_window,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16, unpadded=args.unpadded, seed=args.seed, strategy=args.strategy, device=args.device,
        num_workers=args.num_workers,
        save_steps=args.save_steps, save_total_limit=args.save_total_limit, save_layout=args.save_layout,
        logging_steps=args.logging_steps, report_to=report, resume=args.resume, overwrite=args.overwrite,
        progress=args.progress, step_delay=args.step_delay,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from llava.train.loop import train

    result = train(config_from_args(args))
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(f"trained {result.global_step} steps in {result.wall_time_s:.1f}s (final loss {loss}); wrote {result.out}")
    return 0


def add_train_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `train` on the `llava` command's subparsers."""
    p = subparsers.add_parser("train", help="train a LLaVA model (pretrain, finetune, lora, qlora)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m llava.train ...` (what torchrun runs); user errors print one line and exit 2."""
    from llava.console import run_command

    parser = argparse.ArgumentParser(prog="python -m llava.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    args = parser.parse_args(argv)
    return run_command("llava train", lambda: cmd_train(args))
