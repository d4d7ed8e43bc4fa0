"""`llava data synth`: write the synthetic training and eval set (see `llava.data.synth`);
`llava data synth-bench`: write the synthetic world as the real benchmarks' files plus a suite
(see `llava.data.synth_benchmarks`).

    llava data synth --out data/synth --seed 0 --n 5000 [--image-size 96] [--eval-n 1400]
    llava data synth-bench --out bench --seed 0 [--n 40] [--only pope,mme]
    llava eval run --suite bench/tiny.toml --model PATH

`add_synth_command(data_subparsers)` registers both on the `data` command's subparsers (so
callers of it get synth-bench too); standalone, `python -m llava.data.synth_cli --out ...` runs
`synth` and `python -m llava.data.synth_cli synth-bench --out ...` runs `synth-bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from llava.data.synth import DEFAULT_EVAL_N, DEFAULT_IMAGE_SIZE, WORLDS
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
    p.add_argument("--world", choices=tuple(WORLDS), default="classic",
                   help="classic: one look, a few wordings; varied: many canvases, scales, shades, strokes, "
                        "backgrounds and wordings; varied-2: varied with smaller small shapes and groups drawn "
                        "alike (default classic)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="rendering processes (output does not depend on it)")
    p.add_argument("--json", action="store_true", help="print meta.json instead of a summary")


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from llava.data.synth_benchmarks import BENCHMARKS, DEFAULT_N

    p.add_argument("--out", required=True, help="output folder: one subfolder per benchmark, and tiny.toml")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--n", type=int, default=DEFAULT_N,
                   help=f"about this many questions per benchmark (default {DEFAULT_N})")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help=f"pixels (default {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(BENCHMARKS)}")
    p.add_argument("--json", action="store_true", help="print synth_benchmarks.json instead of a summary")


def add_synth_command(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `synth` (and `synth-bench`, see `add_synth_bench_command`) on the subparsers of `llava data`."""
    p = data_subparsers.add_parser("synth", help="generate the synthetic shapes-and-words dataset")
    _add_arguments(p)
    p.set_defaults(func=cmd_synth)
    add_synth_bench_command(data_subparsers)
    return p


def add_synth_bench_command(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `synth-bench` on the subparsers of `llava data`."""
    p = data_subparsers.add_parser("synth-bench", help="write the synthetic world as the real benchmarks' files "
                                   "(POPE, ScienceQA, VQAv2, MME, MMBench, SEED, GQA, LLaVA-Bench, MM-Vet) + tiny.toml")
    _add_bench_arguments(p)
    p.set_defaults(func=cmd_synth_bench)
    return p


def cmd_synth_bench(args: argparse.Namespace) -> int:
    from llava.data.synth_benchmarks import SUITE_FILE, write_benchmarks

    start = time.perf_counter()
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    meta = write_benchmarks(args.out, seed=args.seed, n_per_benchmark=args.n, image_size=args.image_size,
                            benchmarks=only)
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    counts = ", ".join(f"{name} {k}" for name, k in meta["questions"].items())
    print(f"wrote {len(meta['questions'])} benchmark(s) to {args.out} in {time.perf_counter() - start:.1f}s "
          f"(questions: {counts})")
    print(f"run them with: llava eval run --suite {os.path.join(args.out, SUITE_FILE)} --model PATH")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from llava.data.synth import generate

    start = time.perf_counter()
    meta = generate(args.out, seed=args.seed, n=args.n, image_size=args.image_size, eval_n=args.eval_n,
                    text_only=args.text_only, workers=args.workers, text_mc=args.text_mc,
                    max_objects=args.max_objects, world=args.world)
    if args.json:
        print(json.dumps(meta, indent=2))
    else:
        print(f"wrote {meta['images']['count']} images, pretrain.json ({meta['n']} rows), instruct.json "
              f"({meta['n'] + meta['text_only']} rows), eval.jsonl ({meta['eval_n']} questions) to {args.out} "
              f"in {time.perf_counter() - start:.1f}s")
        print(f"train with --image-folder {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth-bench"]:
        p = argparse.ArgumentParser(prog="python -m llava.data.synth_cli synth-bench")
        _add_bench_arguments(p)
        return cmd_synth_bench(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(prog="python -m llava.data.synth_cli", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return cmd_synth(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
