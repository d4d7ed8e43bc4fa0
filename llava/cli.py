"""The `llava` command: run, chat, convert, info, data, train, recipe.

Each subcommand is a small function over the Python API; errors the user can fix (bad
paths, bad images, wrong tag counts, too-long prompts) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from llava.generate.engine import ContextTooLong
from llava.processing.image import ImageError
from llava.processing.tokenize import PromptError

USER_ERRORS = (FileNotFoundError, ImageError, PromptError, ContextTooLong, ValueError, TypeError, ImportError)


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
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                max_new_tokens=args.max_new_tokens, seed=args.seed)


def load_from_args(args: argparse.Namespace):
    from llava.api import load

    quantize = "8bit" if args.load_8bit else "4bit" if args.load_4bit else "int8" if args.int8 else None
    return load(args.model, model_base=args.model_base, device=args.device, dtype=args.dtype,
                vision_tower=args.vision_tower, template=args.template, quantize=quantize)


def cmd_run(args: argparse.Namespace) -> int:
    pipe = load_from_args(args)
    print(pipe.generate(args.query, images=args.image or None, **sampling_from(args)))
    return 0


def chat_loop(pipe, images: Sequence[str], sampling: dict, read: Callable[[str], str] = input,
              write: Callable[[str], None] = None, debug: bool = False) -> None:
    """The original CLI's loop: the image(s) go with the first message; empty input or EOF ends it.

    `debug`: after each reply, print the rendered prompt and the reply, as the original's --debug does."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    user_role, assistant_role = pipe.template.roles
    user_role = user_role.strip() or "USER"
    assistant_role = assistant_role.strip() or "ASSISTANT"
    messages: list[dict] = []
    pending = list(images)
    if pending:
        pipe.encode_images(pending)  # fail early on a bad image, before the first question
    while True:
        try:
            text = read(f"{user_role}: ")
        except (EOFError, KeyboardInterrupt):
            text = ""
        if not text.strip():
            write("exit...\n")
            return
        messages.append({"role": "user", "content": text, "images": pending})
        pending = []
        write(f"{assistant_role}: ")
        reply = ""
        try:
            for delta in pipe.stream(messages, **sampling):
                reply += delta
                write(delta)
        except ContextTooLong as err:
            write(f"\n[{err}]\n")
            messages.pop()
            continue
        write("\n")
        if debug:
            write(f"\n{ {'prompt': pipe.prepare_chat(messages).prompt, 'outputs': reply} }\n\n")
        messages.append({"role": "assistant", "content": reply.strip()})


def cmd_chat(args: argparse.Namespace) -> int:
    pipe = load_from_args(args)
    chat_loop(pipe, args.image or [], sampling_from(args))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from llava.checkpoint import convert

    convert(args.src, args.dst, to=args.to, model_base=args.model_base, vision_tower=args.vision_tower)
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

    chat = sub.add_parser("chat", help="interactive multi-turn chat, streaming")
    add_model_args(chat)
    chat.add_argument("--image", "--image-file", action="append", help="image for the first message (repeatable)")
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    conv = sub.add_parser("convert", help="convert a checkpoint between the llava-hf and original layouts")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--to", choices=["hf", "original"], default="hf")
    conv.add_argument("--model-base", default=None, help="base LM, for a LoRA or projector-only source")
    conv.add_argument("--vision-tower", default=None)
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
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if os.environ.get("LLAVA_DEBUG"):
            raise
        print(f"llava {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
