"""`llava recipe tiny`: train the project's tiny LLaVA from scratch (see `llava.recipe.tiny`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

# The named sizes of `llava.recipe.sizes.SIZES`, listed here so that building the parser imports no torch
# (a test checks the two lists are the same).
SIZE_NAMES = ("full", "full-no-readouts", "full-96", "classic", "varied", "reduced", "small", "full-vmix", "direct-128",
              "full-centre", "full-varied-2", "full-varied-2-chats", "full-hires",
              "full-hires-fresh")


def cmd_recipe_tiny(args: argparse.Namespace) -> int:
    from llava.eval.synth import format_report
    from llava.recipe.tiny import run_recipe

    summary = run_recipe(args.out, seed=args.seed, size=args.size, workers=args.workers, threads=args.threads,
                         reuse=args.reuse, device=args.device)
    print("[recipe] held-out, real images:\n" + format_report(summary["metrics"]["real"]))
    print("[recipe] held-out, blank images:\n" + format_report(summary["metrics"]["blank"]))
    return 0


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    tiny = sub.add_parser("tiny", help="the tiny LLaVA: data, stage 0, stage 1, stage 2, eval, model card",
                          description=__doc__)
    tiny.add_argument("--out", default="runs/tiny", help="output folder (the model ends up in OUT/stage2)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--size", choices=SIZE_NAMES, default="full",
                      help="full: the shipped model (~2 h on 2 cores with bf16 instructions): the classic world, "
                           "a tower that also pretrains on the varied world and names each shape's centre patch and "
                           "the printed word's patches, then a last phase of stage 2 in the varied world at 128 px, "
                           "for pictures drawn other ways; full-no-readouts: the model shipped before it (its tower "
                           "without those readouts); full-96: the one before that (that phase at 96 px, a tower of "
                           "the classic world); classic: the one before that, without the phase; varied: the varied "
                           "world only (work in progress, see llava/recipe/sizes.py); reduced: ~8 min, a simpler "
                           "world (at most 2 objects a scene) where colour and the printed word are learnt; small: a "
                           "one-minute smoke run; full-vmix: an experiment, full-no-readouts with that phase at 96 "
                           "px; direct-128: full-no-readouts without stage 2's classic phases; full-centre: an "
                           "experiment, full without the word readout; full-varied-2: the next candidate, full with "
                           "the varied world's second edition (smaller shapes, groups drawn alike); "
                           "full-varied-2-chats: full with that edition in its last phase only; full-hires: that, "
                           "with a tower that went on at 128 px before that phase (sizes.py)")
    tiny.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="processes rendering the images")
    tiny.add_argument("--threads", type=int, default=None,
                      help="torch threads (default: torch's; 1 is faster on a busy machine)")
    tiny.add_argument("--reuse", action="store_true",
                      help="keep what is already in OUT: the data, tokenizer, vision tower and LM, and each "
                           "finished training stage whose config is unchanged, and resume a killed one from its "
                           "last checkpoint (restarting a run; the card reports the earlier times)")
    tiny.add_argument("--device", default="cpu", help="cpu (the shipped model's), cuda, mps")
    tiny.set_defaults(func=cmd_recipe_tiny)


def add_recipe_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `recipe` on the `llava` command's subparsers."""
    p = subparsers.add_parser("recipe", help="reproduce a whole training recipe (tiny: the default model)")
    add_recipe_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava.recipe")
    add_recipe_args(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
