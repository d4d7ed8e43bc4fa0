"""The `llava` command: run, chat, convert, info, data, train, recipe.

Each subcommand is a small function over the Python API. Arguments are checked before any
model loads (a missing image or an unknown device fails in a fraction of a second); errors the
user can fix print one line and exit 2 (`llava.console`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from llava.console import exit_with, run_command
from llava.serve.cli import CHAT_HELP


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "--model-path", dest="model", default=None,
                   help="checkpoint folder or hub name (default: the bundled tiny model)")
    p.add_argument("--model-base", default=None, help="base LM for LoRA or projector-only checkpoints")
    p.add_argument("--vision-tower", default=None, help="local folder of the vision tower, overriding the checkpoint's")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16/fp16 on GPU")
    p.add_argument("--template", "--conv-mode", dest="template", default=None, help="conversation template (default: from the model)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-8bit", action="store_true", help="8-bit weights through bitsandbytes")
    q.add_argument("--load-4bit", action="store_true", help="4-bit nf4 weights through bitsandbytes")
    q.add_argument("--int8", action="store_true", help="dynamic int8 language model (CPU)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.2, max_new_tokens: int = 512) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    p.add_argument("--top-k", dest="top_k", type=int, default=0)
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=max_new_tokens)
    p.add_argument("--seed", type=int, default=None)


def sampling_from(args: argparse.Namespace) -> dict:
    """The sampling flags as keyword arguments, checked now so bad values fail before the model loads."""
    from llava.api import sampling_params

    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    max_new_tokens=args.max_new_tokens, seed=args.seed)
    sampling_params(**sampling)
    return sampling


def images_from(args: argparse.Namespace) -> list:
    """Every --image decoded now (a missing or corrupt one fails before the model loads, or torch is imported)."""
    from llava.processing.image_io import load_image

    return [load_image(image) for image in args.image or []]


def load_from_args(args: argparse.Namespace):
    from llava.api import load

    quantize = "8bit" if args.load_8bit else "4bit" if args.load_4bit else "int8" if args.int8 else None
    return load(args.model, model_base=args.model_base, device=args.device, dtype=args.dtype,
                vision_tower=args.vision_tower, template=args.template, quantize=quantize)


def cmd_run(args: argparse.Namespace) -> int:
    images, sampling = images_from(args), sampling_from(args)
    pipe = load_from_args(args)
    print(pipe.generate(args.query, images=images or None, **sampling))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from llava.serve.cli import chat_loop

    images, sampling = images_from(args), sampling_from(args)
    pipe = load_from_args(args)
    print(f"[{CHAT_HELP}]", file=sys.stderr)
    chat_loop(pipe, images, sampling, short=args.short)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from llava.checkpoint import convert

    convert(args.src, args.dst, to=args.to, model_base=args.model_base, vision_tower=args.vision_tower,
            overwrite=args.overwrite)
    print(f"wrote {args.to} layout to {args.dst}")
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
    add_model_args(chat)
    chat.add_argument("--image", "--image-file", action="append", help="image for the first message (repeatable)")
    chat.add_argument("--short", action="store_true",
                      help="ask for short answers (the bundled model's training format); /short toggles it")
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    conv = sub.add_parser("convert", help="convert a checkpoint between the llava-hf and original layouts")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=["hf", "original"], default="hf")
    conv.add_argument("--model-base", default=None, help="base LM, for a LoRA or projector-only source")
    conv.add_argument("--vision-tower", default=None)
    conv.add_argument("--overwrite", action="store_true", help="replace DST when it exists and is not empty")
    conv.set_defaults(func=cmd_convert)

    info = sub.add_parser("info", help="what a checkpoint is: layout, sizes, template")
    info.add_argument("path")
    info.add_argument("--model-base", default=None)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    from llava.train.data_cli import add_data_commands

    add_data_commands(sub)

    from llava.train.cli import add_train_command

    add_train_command(sub)

    from llava.recipe.cli import add_recipe_command

    add_recipe_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(f"llava {args.command}", lambda: args.func(args))


def entry_point() -> None:
    """The `llava` console script."""
    exit_with(run_command("llava", main))


if __name__ == "__main__":
    entry_point()
