"""`llava data synth`: write the synthetic training and eval set (see `llava.data.synth`).

    llava data synth --out data/synth --seed 0 --n 5000 [--image-size 96] [--eval-n 1400]

Register it with `add_synth_command(data_subparsers)` on the `data` command's subparsers;
standalone it runs as `python -m llava.data.synth_cli --out ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from llava.data.synth import DEFAULT_EVAL_N, DEFAULT_IMAGE_SIZE
from llava.data.synth_scene import MAX_OBJECTS


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (also the --image-folder of every file written)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes; use another seed for a held-out set")
    p.add_argument("--n", type=int, default=5000, help="training images (default 5000)")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help=f"pixels (default {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--eval-n", type=int, default=DEFAULT_EVAL_N,
                   help=f"eval questions, one image each (default {DEFAULT_EVAL_N}: 200 per category)")
    p.add_argument("--text-only", type=int, default=None, help="text-only instruct chats (default n/10)")
    p.add_argument("--text-mc", type=float, default=0.0,
                   help="share of the text-only questions asked as lettered multiple choice (default 0)")
    p.add_argument("--max-objects", type=int, default=MAX_OBJECTS,
                   help=f"objects a scene at most, 2-{MAX_OBJECTS} (default {MAX_OBJECTS}; fewer make a simpler world)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="rendering processes (output does not depend on it)")
    p.add_argument("--json", action="store_true", help="print meta.json instead of a summary")


def add_synth_command(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `synth` on the subparsers of `llava data`."""
    p = data_subparsers.add_parser("synth", help="generate the synthetic shapes-and-words dataset")
    _add_arguments(p)
    p.set_defaults(func=cmd_synth)
    return p


def cmd_synth(args: argparse.Namespace) -> int:
    from llava.data.synth import generate

    start = time.perf_counter()
    meta = generate(args.out, seed=args.seed, n=args.n, image_size=args.image_size, eval_n=args.eval_n,
                    text_only=args.text_only, workers=args.workers, text_mc=args.text_mc,
                    max_objects=args.max_objects)
    if args.json:
        print(json.dumps(meta, indent=2))
    else:
        print(f"wrote {meta['images']['count']} images, pretrain.json ({meta['n']} rows), instruct.json "
              f"({meta['n'] + meta['text_only']} rows), eval.jsonl ({meta['eval_n']} questions) to {args.out} "
              f"in {time.perf_counter() - start:.1f}s")
        print(f"train with --image-folder {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava.data.synth_cli", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return cmd_synth(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
