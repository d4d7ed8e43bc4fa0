"""`python -m llava.serve.cli` with the original's flags: an interactive, streaming chat."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.serve.cli")
    p.add_argument("--model-path", type=str, default=None)
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--image-file", type=str, default=None)
    p.add_argument("--device", type=str, default=None)
    p.add_argument("--conv-mode", type=str, default=None)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--vision-tower", type=str, default=None)
    p.add_argument("--debug", action="store_true", help="print the rendered prompt and reply after each turn")
    return p


def main(argv=None) -> int:
    from llava.api import load
    from llava.cli import USER_ERRORS, chat_loop

    args = build_parser().parse_args(argv)
    quantize = "8bit" if args.load_8bit else "4bit" if args.load_4bit else None
    try:
        pipe = load(args.model_path, model_base=args.model_base, device=args.device, template=args.conv_mode,
                    quantize=quantize, vision_tower=args.vision_tower)
        chat_loop(pipe, [args.image_file] if args.image_file else [],
                  dict(temperature=args.temperature, max_new_tokens=args.max_new_tokens), debug=args.debug)
    except USER_ERRORS as err:
        print(f"llava.serve.cli: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
