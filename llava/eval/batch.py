"""`llava batch`: answer a prompt about every image in a folder (or a list), batched and resumable.

    llava batch --images photos/ --prompt "Describe the image." --out captions.jsonl --batch-size 16
    llava batch --images list.txt --prompts prompts.jsonl --out results.csv

Exactly one output row per input image, `{"image", "prompt", "answer"}`, plus `"error"` (and an
empty answer) for an image that cannot be read: one bad file in 10,000 does not stop the run.
A rerun of the same command skips the images already in --out (a half-written last row from a
crash is cut away and redone), so a killed run loses at most the batch in flight.

--images: a folder (its image files, sorted by name, not recursive) or a text file with one image
path per line. --prompts: JSON lines `{"image": PATH-or-file-name, "prompt": TEXT}`, one per image.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava.errors import DataError, ImageError, InputError
from llava.eval.resume import batches, open_rows, read_jsonl_numbered, read_rows

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
FIELDS = ("image", "prompt", "answer", "error")


def list_images(source: str | os.PathLike) -> list[str]:
    """The images a folder holds (sorted) or a list file names (in order, duplicates dropped)."""
    path = Path(source)
    if path.is_dir():
        return [str(p) for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not path.is_file():
        raise InputError(f"--images {source}: no such folder or list file")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(n for n in names if n and not n.startswith("#")))


def read_prompts(path: str | os.PathLike, images: Sequence[str]) -> dict[str, str]:
    """image -> prompt from a prompts JSONL, matched by the path as listed or by file name."""
    table: dict[str, str] = {}
    for line, row in read_jsonl_numbered(path, "prompts file"):
        if not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
            raise DataError(f"prompts file {path}, line {line}: needs a string \"image\" and a string \"prompt\"")
        table[row["image"]] = row["prompt"]
    prompts = {}
    for image in images:
        prompt = table.get(image, table.get(os.path.basename(image)))
        if prompt is None:
            raise DataError(f"prompts file {path} has no prompt for image {image}")
        prompts[image] = prompt
    return prompts


def _answer_batch(pipe: Any, batch: Sequence[tuple[str, str]], params: Any) -> list[dict]:
    """Rows for one batch: unreadable images get an error row; the rest go through the engine together."""
    rows: list[dict] = []
    prepared, slots = [], []
    for image, prompt in batch:
        row = {"image": image, "prompt": prompt, "answer": ""}
        try:
            prepared.append(pipe.prepare(prompt, images=[image], encode=False))
            slots.append(row)
        except (ImageError, OSError) as err:
            row["error"] = " ".join(str(err).split())
        rows.append(row)
    if prepared:
        for row, completion in zip(slots, pipe.engine.generate([p.request for p in prepared], params)):
            row["answer"] = completion.text.strip()
    return rows


def run_batch(args: argparse.Namespace) -> int:
    """Check the inputs, skip what --out already has, load the model, answer the rest."""
    from tqdm import tqdm

    from llava.cli_args import load_from_args, sampling_from

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    sampling = sampling_from(args)
    images = list_images(args.images)
    prompts = read_prompts(args.prompts, images) if args.prompts else {image: args.prompt for image in images}
    out = Path(args.out)
    done = {row.get("image") for row in read_rows(out, FIELDS)}
    todo = [(image, prompts[image]) for image in images if image not in done]
    print(f"{len(images)} image(s), {len(images) - len(todo)} already in {out}, {len(todo)} to answer", file=sys.stderr)
    if not todo:
        return 0
    pipe = load_from_args(args)
    params = pipe.sampling(**sampling)
    _, writer = open_rows(out, FIELDS)
    started, errors = time.perf_counter(), 0
    with writer, tqdm(total=len(todo), desc="batch", unit="img", file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in batches(todo, args.batch_size):
            for row in _answer_batch(pipe, batch, params):
                errors += "error" in row
                writer.write(row)
            writer.sync()
            bar.update(len(batch))
    elapsed = time.perf_counter() - started
    print(f"answered {len(todo)} image(s) in {elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9):.2f} img/s)"
          + (f"; {errors} could not be read (see their \"error\")" if errors else ""), file=sys.stderr)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llava.cli_args import add_model_args, add_sampling_args

    p.add_argument("--images", required=True, help="a folder of images, or a text file with one path per line")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the prompt asked about every image")
    which.add_argument("--prompts", help="JSON lines {\"image\": ..., \"prompt\": ...}, one per image")
    p.add_argument("--out", required=True, help="results file: .jsonl, or .csv (appended to; reruns resume)")
    p.add_argument("--batch-size", type=int, default=8, help="images per engine call")
    add_model_args(p)
    add_sampling_args(p, temperature=0.0, max_new_tokens=512)


def add_batch_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `llava batch` on the top-level command's subparsers; it runs `args.func(args)`."""
    p = subparsers.add_parser("batch", help="answer a prompt about every image in a folder or list",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run_batch)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from llava.console import run_command

    p = argparse.ArgumentParser(prog="llava batch", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_command("llava batch", lambda: run_batch(args))


if __name__ == "__main__":
    from llava.console import exit_with

    exit_with(main())
