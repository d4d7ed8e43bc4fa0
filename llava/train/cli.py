"""`llava train` and `python -m llava.train`: the same arguments, one TrainConfig.

Every recipe flag defaults to None, meaning "the stage's LLaVA-1.5 value"
(see `llava.train.config.STAGES`), so `--stage finetune` alone reproduces the v1.5 recipe
and any flag given overrides just that value.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from llava.dataclass_cli import add_dataclass_args, from_args
from llava.train.config import TrainConfig


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The training flags, on any parser (a `llava` subcommand or `python -m llava.train`): one per
    TrainConfig field, with its help, aliases and group from the field (llava.dataclass_cli)."""
    add_dataclass_args(p, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return from_args(TrainConfig, args)


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
