"""The `llava` command: run, chat, convert, info, data, train, recipe.

Each subcommand is a small function over the Python API; the flags they share are in
`llava.cli_args`. This module is the top of the import graph: nothing in llava imports it.
Arguments are checked before any model loads (a missing image or an unknown device fails in a
fraction of a second); errors the user can fix print one line and exit 2 (`llava.console`).
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from llava.cli_args import (
    add_model_args,
    add_sampling_args,
    images_from,
    load_from_args,
    sampling_from,
)
from llava.console import exit_with, run_command
from llava.serve.cli import CHAT_HELP, add_chat_args, run_chat


def cmd_run(args: argparse.Namespace) -> int:
    images, sampling = images_from(args), sampling_from(args)
    pipe = load_from_args(args)
    print(pipe.generate(args.query, images=images or None, **sampling))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from llava.checkpoint import convert

    convert(args.src, args.dst, to=args.to, model_base=args.model_base, vision_tower=args.vision_tower,
            overwrite=args.overwrite, quant=args.quant)
    print(f"wrote {args.to} layout to {args.dst}" if args.to != "gguf" else f"wrote GGUF files to {args.dst}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from llava.checkpoint import describe

    info = describe(args.path, model_base=args.model_base)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava", description="LLaVA: chat about images, convert and inspect checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one question about image(s) and exit")
    add_model_args(run)
    run.add_argument("--image", "--image-file", action="append", help="image path or URL (repeatable)")
    run.add_argument("--query", "-q", required=True)
    add_sampling_args(run, temperature=0.0)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="interactive multi-turn chat, streaming",
                          epilog=f"In the chat: {CHAT_HELP}.")
    add_chat_args(chat)
    chat.set_defaults(func=run_chat)

    conv = sub.add_parser("convert", help="convert a checkpoint between the llava-hf and original layouts, "
                                          "or to GGUF files for llama.cpp")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=["hf", "original", "gguf"], default="hf")
    conv.add_argument("--quant", default=None, help="GGUF weight type: f32, f16 (default), bf16, q8_0, q4_0")
    conv.add_argument("--model-base", default=None, help="base LM, for a LoRA or projector-only source")
    conv.add_argument("--vision-tower", default=None)
    conv.add_argument("--overwrite", action="store_true", help="replace DST when it exists and is not empty")
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="what a checkpoint is: layout, sizes, template")
    info.add_argument("path")
    info.add_argument("--model-base", default=None)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    add_subcommands(sub)
    return parser


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Subcommands whose parsers live with their code: each module offers `add_*_command(subparsers)`.

    Only the top-level `llava.cli` imports them (lower layers never import this module); a new one,
    is one more import and line here.
    """
    from llava.eval.batch import add_batch_command
    from llava.eval.score_cli import add_eval_command
    from llava.recipe.cli import add_recipe_command
    from llava.serve.app import add_serve_command
    from llava.train.cli import add_train_command
    from llava.train.data_cli import add_data_commands

    add_serve_command(sub)
    add_eval_command(sub)
    add_batch_command(sub)
    add_data_commands(sub)
    add_train_command(sub)
    add_recipe_command(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"llava {args.command}", lambda: args.func(args))


def entry_point() -> None:
    """The `llava` console script."""
    exit_with(run_command("llava", main))


if __name__ == "__main__":
    entry_point()
