"""`python -m llava.eval.run_llava` with the original's flags, and `eval_model(args)`.

    python -m llava.eval.run_llava --model-path PATH --image-file a.png --query "What is shown?" --temperature 0

Prints only the answer on stdout (loading messages go to stderr). The parser keeps the original's
flag spellings and attribute names (`args.model_path`, ...), which are `eval_model`'s interface,
so it does not use `llava.cli_args.add_model_args`.
"""

from __future__ import annotations

import argparse

from llava.cli_args import quantize_from
from llava.console import exit_with, run_command
from llava.errors import InputError

IMAGE_PLACEHOLDER = "<image-placeholder>"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.eval.run_llava")
    p.add_argument("--model-path", type=str, default=None)
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--image-file", type=str, default=None, help="one or more images joined by --sep")
    p.add_argument("--query", type=str, required=True)
    p.add_argument("--conv-mode", type=str, default=None)
    p.add_argument("--sep", type=str, default=",")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--device", type=str, default=None)
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--vision-tower", type=str, default=None)
    return p


def eval_model(args) -> str:
    """Answer `args.query` about `args.image_file`; prints and returns the answer."""
    from llava.api import load
    from llava.processing.image_io import load_image

    if getattr(args, "num_beams", 1) not in (None, 1):
        raise InputError("beam search (num_beams > 1) is not supported; use --num_beams 1")
    quantize = quantize_from(args)
    images = [load_image(f) for f in (args.image_file or "").split(getattr(args, "sep", ",")) if f]  # before the load
    pipe = load(args.model_path, model_base=getattr(args, "model_base", None), device=getattr(args, "device", None),
                template=getattr(args, "conv_mode", None), quantize=quantize,
                vision_tower=getattr(args, "vision_tower", None))
    query = args.query
    if IMAGE_PLACEHOLDER in query:
        query = query.replace(IMAGE_PLACEHOLDER, "<image>")
    answer = pipe.generate(query, images=images or None, temperature=args.temperature or 0.0,
                           top_p=getattr(args, "top_p", None) or 1.0, max_new_tokens=args.max_new_tokens)
    print(answer)
    return answer


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        eval_model(args)
        return 0

    return run_command("run_llava", command)


if __name__ == "__main__":
    exit_with(main())
