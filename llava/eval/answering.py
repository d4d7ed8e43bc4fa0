"""Answer a benchmark's question file at scale: batched, resumable, chunked or sharded over ranks.

The original's `model_vqa*.py` scripts answer one question at a time and overwrite their answers
file; a crash at question 90,000 of VQAv2 starts over. Here every question goes through the
project's one batched engine (`pipe.engine.generate`), answers are appended row by row
(`llava.eval.resume`), and a rerun of the same command skips what is done. Answer rows keep the
original's shape, so its scorers read them unchanged:

    {"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}

Everything that can be checked before the model loads is (question file, answers file, that
every image exists), so a bad input costs seconds, not a model load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava.errors import DataError, ImageError, ImageNotFound, InputError
from llava.eval.resume import Row, batches, open_rows, read_jsonl_numbered, read_rows

IMAGE_TAG = "<image>"


@dataclass
class Item:
    """One model call: `query` (without the image tag) about `image`, and the answer row's fields.

    `head` fields come before "text" in the answer row, `tail` fields after it (the original's
    key order); `key` identifies the item for resuming (question_id, plus round_id for MMBench).
    """

    key: tuple
    query: str
    image: Any = None  # a path, bytes, a PIL image, or None for a text-only question
    head: Row = field(default_factory=dict)
    tail: Row = field(default_factory=dict)
    label: str = ""  # how error messages name the item


@dataclass
class AnswerJob:
    """Where answers go and how they are made; `key_fields` name the answer row's key."""

    answers_file: Path
    batch_size: int = 1
    sampling: dict = field(default_factory=dict)
    model_id: str = ""
    key_fields: tuple[str, ...] = ("question_id",)


def new_answer_id() -> str:
    """A 22-character id, the length of the original's shortuuid (which is not a dependency here)."""
    return uuid.uuid4().hex[:22]


def model_name_from_path(path: str | None) -> str:
    """The original's `get_model_name_from_path`: the last folder, with a `checkpoint-N` parent prefixed."""
    if not path:
        return "tiny-llava"
    parts = str(path).strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def get_chunk(items: Sequence[Any], num_chunks: int, chunk_idx: int) -> list[Any]:
    """The original's `split_list`/`get_chunk`: ceil-sized contiguous chunks (past the end: empty)."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise InputError(f"--chunk-idx must be in 0..{num_chunks - 1} and --num-chunks >= 1, "
                         f"got {chunk_idx} of {num_chunks}")
    size = max(1, math.ceil(len(items) / num_chunks))
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


# Question files -------------------------------------------------------------------------------
def read_questions(path: str | os.PathLike, image_folder: str | os.PathLike = "") -> list[Item]:
    """A `model_vqa`/`model_vqa_loader` question file -> items; bad rows name the file and line."""
    items, seen = [], {}
    for line, row in read_jsonl_numbered(path, "question file"):
        where = f"question file {path}, line {line}"
        if "question_id" not in row or not isinstance(row.get("text"), str):
            raise DataError(f"{where}: a question needs \"question_id\" and a string \"text\"")
        qid = row["question_id"]
        if not isinstance(qid, (str, int)) or isinstance(qid, bool):
            raise DataError(f"{where}: question_id must be a string or an integer, got {qid!r:.40}")
        if qid in seen:
            raise DataError(f"{where}: question_id {qid!r} already used on line {seen[qid]}")
        seen[qid] = line
        image = row.get("image")
        if image is not None and not isinstance(image, str):
            raise DataError(f"{where}: \"image\" must be a file name, got {type(image).__name__}")
        image_path = os.path.join(image_folder, image) if image else None
        items.append(Item(key=(qid,), query=row["text"], image=image_path,
                          head={"question_id": qid, "prompt": row["text"]}, label=f"question {qid!r}"))
    return items


def check_images_exist(items: Sequence[Item]) -> None:
    """Every image path is a file: a missing one stops the run before the model loads."""
    for item in items:
        if isinstance(item.image, (str, os.PathLike)) and not os.path.isfile(item.image):
            raise ImageNotFound(f"{item.label}: image {item.image} not found; nothing was answered for it "
                                "(answers so far are kept; fix the image or --image-folder and rerun)")


# Resuming ----------------------------------------------------------------------------------
def row_key(row: Row, key_fields: Sequence[str]) -> tuple:
    return tuple(row.get(name) for name in key_fields)


def pending_items(items: Sequence[Item], all_keys: set, done_rows: Sequence[Row], job: AnswerJob,
                  source: str) -> list[Item]:
    """The items not answered yet; answers to questions outside this question file are an error."""
    done = {row_key(row, job.key_fields) for row in done_rows}
    stray = [key for key in done if key not in all_keys]
    if stray:
        shown = ", ".join(repr(k[0] if len(k) == 1 else k) for k in sorted(stray, key=repr)[:3])
        raise DataError(f"answers file {source} holds {len(stray)} answer(s) to questions that are not in this "
                        f"question file (e.g. {shown}); it belongs to another question set. Nothing was written; "
                        "pick another --answers-file or move that one away")
    return [item for item in items if item.key not in done]


# Answering ---------------------------------------------------------------------------------
def prepare_item(pipe: Any, item: Item) -> Any:
    """The engine request for one item, its image decoded now; a bad image names the item."""
    images = [] if item.image is None else [item.image]
    query = item.query if not images or IMAGE_TAG in item.query else f"{IMAGE_TAG}\n{item.query}"
    try:
        return pipe.prepare(query, images=images, encode=False)
    except ImageError as err:
        raise type(err)(f"{item.label}: {err}") from None


def answer_items(pipe: Any, items: Sequence[Item], job: AnswerJob, path: Path | None = None,
                 desc: str = "answering") -> int:
    """Answer `items` in batches through the engine, appending one row each to `path`; returns the count.

    Each batch is fsynced before the next starts, so a kill loses at most the batch in flight.
    """
    from tqdm import tqdm

    params = pipe.sampling(**job.sampling)
    _, writer = open_rows(path or job.answers_file)  # cuts a half-written last row away
    started = time.perf_counter()
    with writer, tqdm(total=len(items), desc=desc, unit="q", file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in batches(items, job.batch_size):
            prepared = [prepare_item(pipe, item) for item in batch]
            completions = pipe.engine.generate([p.request for p in prepared], params)
            for item, completion in zip(batch, completions):
                writer.write({**item.head, "text": completion.text.strip(), **item.tail,
                              "answer_id": new_answer_id(), "model_id": job.model_id, "metadata": {}})
            writer.sync()
            bar.update(len(batch))
    elapsed = time.perf_counter() - started
    if items:
        print(f"answered {len(items)} question(s) in {elapsed:.1f}s ({len(items) / max(elapsed, 1e-9):.2f} q/s)",
              file=sys.stderr)
    return len(items)


# Chunks and torchrun shards ------------------------------------------------------------------
@dataclass
class Plan:
    """Which items this process answers, and into which file."""

    items: list[Item]
    out: Path
    rank: int | None = None  # set when sharding under torchrun
    world: int = 1


def shard_path(answers_file: Path, rank: int) -> Path:
    return answers_file.with_name(f"{answers_file.name}.rank{rank}")


def _done_marker(answers_file: Path, rank: int) -> Path:
    return answers_file.with_name(f"{answers_file.name}.rank{rank}.done")


def _run_token() -> str:
    return os.environ.get("TORCHELASTIC_RUN_ID", "") + ":" + os.environ.get("MASTER_PORT", "")


def make_plan(items: list[Item], answers_file: Path, num_chunks: int, chunk_idx: int | None) -> Plan:
    """--num-chunks/--chunk-idx as the original; under torchrun (RANK/WORLD_SIZE, no --chunk-idx)
    each rank takes chunk RANK of WORLD_SIZE into its own shard file."""
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if chunk_idx is None and world and rank and int(world) > 1:
        world_n, rank_n = int(world), int(rank)
        _done_marker(answers_file, rank_n).unlink(missing_ok=True)
        return Plan(get_chunk(items, world_n, rank_n), shard_path(answers_file, rank_n), rank_n, world_n)
    return Plan(get_chunk(items, num_chunks, chunk_idx or 0), answers_file)


def finish_shards(plan: Plan, all_items: Sequence[Item], job: AnswerJob, poll_s: float = 1.0) -> None:
    """Rank K marks its shard done; rank 0 waits for every mark, then merges all shards (and any
    answers already in the answers file) into it in question order, atomically."""
    if plan.rank is None:
        return
    answers_file = job.answers_file
    _done_marker(answers_file, plan.rank).write_text(_run_token())
    if plan.rank != 0:
        return
    markers = [_done_marker(answers_file, r) for r in range(plan.world)]
    while not all(m.exists() and m.read_text() == _run_token() for m in markers):
        time.sleep(poll_s)
    by_key: dict[tuple, Row] = {}
    for source in [answers_file] + [shard_path(answers_file, r) for r in range(plan.world)]:
        for row in read_rows(source):
            by_key.setdefault(row_key(row, job.key_fields), row)
    merged = [by_key[item.key] for item in all_items if item.key in by_key]
    tmp = answers_file.with_name(answers_file.name + ".merging")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in merged)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, answers_file)
    for r in range(plan.world):
        shard_path(answers_file, r).unlink(missing_ok=True)
        markers[r].unlink(missing_ok=True)
    print(f"merged {plan.world} shards: {len(merged)} answer(s) in {answers_file}", file=sys.stderr)


def run_answering(all_items: list[Item], job: AnswerJob, load: Callable[[], Any], num_chunks: int = 1,
                  chunk_idx: int | None = None, desc: str = "answering") -> int:
    """Check everything, load the model only if something is left to answer, answer, merge shards."""
    all_keys = {item.key for item in all_items}
    plan = make_plan(all_items, job.answers_file, num_chunks, chunk_idx)
    done = read_rows(job.answers_file)
    sources = [str(job.answers_file)]
    if plan.out != job.answers_file:
        done += read_rows(plan.out)
        sources.append(str(plan.out))
    todo = pending_items(plan.items, all_keys, done, job, " / ".join(sources))
    check_images_exist(todo)
    skipped = len(plan.items) - len(todo)
    if skipped:
        print(f"resuming: {skipped} of {len(plan.items)} question(s) already answered in {plan.out}", file=sys.stderr)
    count = answer_items(load(), todo, job, plan.out, desc) if todo else 0
    finish_shards(plan, all_items, job)
    return count


# The original's command line -------------------------------------------------------------------
def build_parser(prog: str, max_new_tokens: int, temperature: float = 0.2,
                 parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The original model_vqa* flags (spellings and defaults), plus --batch-size, --device, --seed."""
    p = parser_class(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", type=str, default=None, help="checkpoint (default: the bundled tiny model)")
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--image-folder", type=str, default="")
    p.add_argument("--question-file", type=str, default="tables/question.jsonl")
    p.add_argument("--answers-file", type=str, default="answer.jsonl")
    p.add_argument("--conv-mode", type=str, default=None, help="template (default: the model's own)")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=None, help="default 0, or RANK under torchrun")
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=max_new_tokens)
    p.add_argument("--batch-size", type=int, default=1, help="questions per engine call (1 = the original)")
    p.add_argument("--device", type=str, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    return p


def job_from_args(args: argparse.Namespace, key_fields: tuple[str, ...] = ("question_id",)) -> AnswerJob:
    """Checks the flags (before anything is read or loaded) and returns the job they describe."""
    from llava.cli_args import sampling_from

    if args.num_beams not in (None, 1):
        raise InputError("beam search is not supported: --num_beams must be 1 (the original's scripts all use 1)")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    args.top_k = 0
    args.top_p = 1.0 if args.top_p is None else args.top_p
    sampling = sampling_from(args)
    return AnswerJob(answers_file=Path(os.path.expanduser(args.answers_file)), batch_size=args.batch_size,
                     sampling=sampling, model_id=model_name_from_path(args.model_path), key_fields=key_fields)


def loader_from_args(args: argparse.Namespace) -> Callable[[], Any]:
    """A function that loads the model the flags name (on cuda:LOCAL_RANK under torchrun)."""
    def load() -> Any:
        from llava.api import load as load_pipeline
        from llava.cli_args import quantize_from

        device = args.device
        if device is None and os.environ.get("LOCAL_RANK") and os.environ.get("WORLD_SIZE", "1") != "1":
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{os.environ['LOCAL_RANK']}"
        return load_pipeline(args.model_path, model_base=args.model_base, device=device,
                             template=args.conv_mode, quantize=quantize_from(args))
    return load


@dataclass(frozen=True)
class Answerer:
    """One of the original's answering commands: its flags, how it reads its question file, its row key.

    `llava eval run` drives the same objects, so a suite answers exactly as the commands do.
    """

    prog: str
    max_new_tokens: int
    read_items: Callable[[argparse.Namespace], list[Item]]
    key_fields: tuple[str, ...] = ("question_id",)
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None

    def parser(self, parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = build_parser(self.prog, self.max_new_tokens, parser_class=parser_class)
        if self.add_flags:
            self.add_flags(p)
        return p

    def answer(self, args: argparse.Namespace, load: Callable[[], Any] | None = None) -> int:
        """Answer what is left of the question file the flags name; `load` (default: from the flags)."""
        job = job_from_args(args, self.key_fields)
        items = self.read_items(args)
        return run_answering(items, job, load or loader_from_args(args), args.num_chunks, args.chunk_idx)

    def main(self, argv: Sequence[str] | None = None) -> int:
        from llava.console import run_command

        args = self.parser().parse_args(argv)

        def command() -> int:
            self.answer(args)
            return 0

        return run_command(self.prog.split()[-1], command)


def read_question_file(args: argparse.Namespace) -> list[Item]:
    """The JSONL question file of `model_vqa` / `model_vqa_loader`."""
    return read_questions(os.path.expanduser(args.question_file), os.path.expanduser(args.image_folder))
