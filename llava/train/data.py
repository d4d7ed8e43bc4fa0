"""Training data: LLaVA conversation records -> token ids, labels and pixel tensors.

Records follow the original format (a JSON list or JSONL of `{"id", "image", "conversations":
[{"from": "human"|"gpt", "value": ...}]}`).  Every row that cannot be used raises (or is
reported) with its id and the reason: a row silently skipped or fully masked is a
training-data bug nobody sees.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from llava.errors import DataError, InputError, LlavaError  # DataError re-exported: raised here
from llava.processing.image import ImageError, load_image
from llava.processing.labels import IGNORE_INDEX, LabelError, build_example
from llava.processing.templates import Template, get_template
from llava.train.records import Row, clip, load_records, parse_record, read_rows, shown_path  # re-exported

Size = tuple[int, int]  # (width, height)
IMAGE_TOKEN_INDEX = -200  # the original's placeholder id; only for display when no model is given
WORDS_PER_IMAGE = 128  # the original's length estimate of one image, for length grouping

__all__ = ["DataError", "Row", "load_records", "read_rows", "parse_record", "validate_record", "refuse_bad_rows",
           "SupervisedDataset", "collate", "check_dataset", "Report", "BadRow", "IMAGE_TOKEN_INDEX"]


def image_path(image_folder: str | os.PathLike | None, name: str) -> str:
    return os.path.join(image_folder, name) if image_folder else name


def read_image_sizes(row: Row, image_folder: str | os.PathLike | None) -> tuple[list[Size], list[str]]:
    """(W, H) of each of the row's images and a problem for each missing or unreadable one."""
    sizes, problems = [], []
    for name in row.images:
        path = image_path(image_folder, name)
        if not os.path.isfile(path):
            problems.append(f"image file not found: {shown_path(path)}")
            continue
        try:  # the decoder training uses, so "readable" means the same thing here and there
            sizes.append(load_image(path, exif=False).size)  # stored pixel order, as the original trains
        except (ImageError, OSError) as e:
            problems.append(clip(str(e) if isinstance(e, ImageError) else f"{shown_path(path)}: {e}", 400))
    return sizes, problems


def validate_record(rec: Any, image_folder: str | os.PathLike | None = None, index: int = 0,
                    check_images: bool = True) -> list[str]:
    """Every problem of one record (structure, roles, tags, and with `check_images` its files)."""
    row, problems = parse_record(rec, index)
    if check_images and row.images:
        problems += read_image_sizes(row, image_folder)[1]
    return problems


def _words(rec: Any) -> int:
    conv = rec.get("conversations") if isinstance(rec, dict) else None
    if not isinstance(conv, list):
        return 0
    return sum(len(t["value"].split()) for t in conv if isinstance(t, dict) and isinstance(t.get("value"), str))


def _n_images(rec: Any) -> int:
    image = rec.get("image") if isinstance(rec, dict) else None
    return len(image) if isinstance(image, list) else int(bool(image))


def refuse_bad_rows(records: Sequence[Any], data: str | os.PathLike, plain: bool = False) -> None:
    """Structural problems of every row, before the first step rather than hours into the run.

    Run before the model loads, and again with `plain` once the template is known. Images and
    token counts are checked when a row is loaded (`llava data check` does all of it).
    """
    bad = []
    for i, record in enumerate(records):
        row, problems = parse_record(record, i)
        if plain and not problems and len(row.turns) != 2:
            problems.append(f"the plain template (stage 1) takes one human and one gpt turn, got {len(row.turns)}")
        if problems:
            bad.append(f"row {row.id}: {'; '.join(problems)}")
    if bad:
        how_many = f"none of the {len(records)} rows can" if len(bad) == len(records) else \
            f"{len(bad)} of {len(records)} rows cannot"
        shown = ";\n  ".join(bad[:5] + ([f"... and {len(bad) - 5} more"] if len(bad) > 5 else []))
        raise DataError(f"{data}: {how_many} be trained on (see `llava data check {data}`):\n  {shown}")


class SupervisedDataset(Dataset):
    """Lazily tokenised training rows: records are read once, images and ids per item.

    `image_token_count((W, H))` must be the model's (`LlavaModel.image_token_count`), so
    anyres images of different sizes get the right number of placeholders, and
    `image_token_index` the model's placeholder id.  A bad row raises `DataError`.
    """

    def __init__(self, data: str | os.PathLike | Sequence[dict], tokenizer, template: str | Template, *,
                 image_token_index: int, image_token_count: Callable[[Size], int] | None = None,
                 image_processor: Callable | None = None, image_folder: str | os.PathLike | None = None,
                 convention: str = "original", max_length: int | None = None) -> None:
        # From a file every row is kept as parsed: a row that is not a record raises with its id when read.
        self.records = list(data) if not isinstance(data, (str, os.PathLike)) else read_rows(data)
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.image_token_index = image_token_index
        self.image_token_count = image_token_count
        self.image_processor = image_processor
        self.image_folder = image_folder
        self.convention = convention
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row, problems = parse_record(self.records[i], i)
        if problems:
            raise DataError("; ".join(problems), row.id)
        pixel_values, sizes = [], []
        if row.images:
            if self.image_processor is None or self.image_token_count is None:
                raise DataError("has images but the dataset has no image_processor / image_token_count", row.id)
            pil = []
            for name in row.images:
                path = image_path(self.image_folder, name)
                if not os.path.isfile(path):
                    raise DataError(f"image file not found: {shown_path(path)}", row.id)
                try:
                    pil.append(load_image(path, exif=False))  # boxes in answers refer to stored pixels
                except (ImageError, OSError) as e:
                    raise DataError(clip(str(e), 400), row.id) from e
            pixel_values, sizes = self.image_processor(pil)
        counts = [int(self.image_token_count(s)) for s in sizes]
        try:
            ids, labels = build_example(self.tokenizer, self.template, row.turns, counts, self.image_token_index,
                                        self.convention, self.max_length)
        except LabelError as e:
            raise DataError(e.reason, row.id) from e
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long),
                "pixel_values": list(pixel_values), "image_sizes": [tuple(s) for s in sizes], "id": row.id}

    @property
    def lengths(self) -> list[int]:
        """Words + 128 per image per row (the original's estimate), without loading images."""
        return [_words(r) + WORDS_PER_IMAGE * _n_images(r) for r in self.records]

    @property
    def modality_lengths(self) -> list[int]:
        """`lengths`, negated for text-only rows, so a sampler can group the two modalities."""
        return [n if _n_images(r) else -n for n, r in zip(self.lengths, self.records)]


def collate(batch: Sequence[dict[str, Any]], pad_token_id: int, max_length: int | None = None) -> dict[str, Any]:
    """Right-pad a batch; images are concatenated in row order, as `LlavaModel.embed` consumes them.

    `max_length` is a guard, not a cutter: only the dataset knows where images sit, so it
    truncates (`SupervisedDataset(max_length=...)`) and a longer row here is an error.
    """
    if pad_token_id is None:
        raise InputError("collate needs a pad_token_id (the original uses the unk token)")
    if not batch:
        raise InputError("cannot collate an empty batch")
    if max_length is not None:
        for item in batch:
            if len(item["input_ids"]) > max_length:
                raise DataError(f"{len(item['input_ids'])} tokens > max_length={max_length}; set max_length on "
                                "the dataset so it truncates without cutting images", item.get("id"))
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[b, :n] = torch.as_tensor(item["input_ids"])
        labels[b, :n] = torch.as_tensor(item["labels"])
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": [p for item in batch for p in item["pixel_values"]],
            "image_sizes": [s for item in batch for s in item["image_sizes"]],
            "images_per_row": [len(item["pixel_values"]) for item in batch],
            "ids": [item.get("id") for item in batch]}


def worker_error(err: LlavaError) -> LlavaError:
    """The error a row raised in a DataLoader worker, as the row raised it.

    torch re-raises it in the main process with the worker's whole traceback as the message,
    which the command line would print as one very long line; the row's message is its tail.
    """
    text = str(err)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return err
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    message = text[text.rfind(name) + len(name):] if name in text else text.strip().splitlines()[-1]
    return type(err)(message.strip())


def unpad_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """A collated (right-padded) batch as one batch per row, each cut to the row's own length."""
    lengths = batch["attention_mask"].sum(1).tolist()
    first = [0]
    for n in batch["images_per_row"]:
        first.append(first[-1] + n)
    rows = []
    for b, n in enumerate(lengths):
        images = slice(first[b], first[b + 1])
        rows.append({"input_ids": batch["input_ids"][b:b + 1, :n], "labels": batch["labels"][b:b + 1, :n],
                     "attention_mask": batch["attention_mask"][b:b + 1, :n],
                     "pixel_values": batch["pixel_values"][images], "image_sizes": batch["image_sizes"][images],
                     "images_per_row": batch["images_per_row"][b:b + 1], "ids": batch["ids"][b:b + 1]})
    return rows


# -- checking a whole file -------------------------------------------------------------------


@dataclass
class BadRow:
    index: int
    id: str
    reason: str


@dataclass
class Report:
    """Every bad row of a data file and statistics of the file."""

    bad_rows: list[BadRow]
    stats: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.bad_rows

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "bad_rows": [vars(b) for b in self.bad_rows], "stats": self.stats}

    def format(self) -> str:
        lines = [f"row {b.id} (#{b.index}): {b.reason}" for b in self.bad_rows]
        lines.append(f"{len(self.bad_rows)} bad row(s) of {self.stats['rows']}")
        for key, value in self.stats.items():
            lines.append(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
        return "\n".join(lines)


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "mean": round(sum(values) / len(values), 2), "max": max(values)}


def check_dataset(path: str | os.PathLike, image_folder: str | os.PathLike | None, tokenizer=None,
                  template: str | Template | None = None, max_length: int | None = None,
                  image_token_count: Callable[[Size], int] | None = None,
                  image_token_index: int = IMAGE_TOKEN_INDEX, convention: str = "original") -> Report:
    """Validate every row of a data file (opening every image) and gather statistics.

    With a tokenizer and template each row is also tokenised and labelled, so rows whose
    labels cannot be built (e.g. truncation by `max_length`) are reported too; images
    count as `image_token_count(size)` tokens (1 each when not given).
    """
    if tokenizer is not None and template is None:
        raise InputError("check_dataset: a tokenizer needs a template to build labels")
    if max_length is not None and max_length <= 0:
        raise InputError(f"max_length must be positive, got {max_length}")
    records = read_rows(path)  # raises for a file that is unreadable, not JSON, or without rows
    count = image_token_count or (lambda size: 1)
    bad: list[BadRow] = []
    turns, tokens, trained, widths, heights = [], [], [], [], []
    truncated = 0
    for i, rec in enumerate(records):
        row, problems = parse_record(rec, i)
        sizes, image_problems = read_image_sizes(row, image_folder)
        problems += image_problems
        widths += [w for w, _ in sizes]
        heights += [h for _, h in sizes]
        if not problems and tokenizer is not None:
            try:
                counts = [count(s) for s in sizes]
                ids, labels = build_example(tokenizer, template, row.turns, counts, image_token_index, convention)
                if max_length is not None and len(ids) > max_length:
                    truncated += 1  # and raise if truncation would cut an image or every answer:
                    build_example(tokenizer, template, row.turns, counts, image_token_index, convention, max_length)
                tokens.append(len(ids))
                trained.append(sum(label != IGNORE_INDEX for label in labels))
            except LabelError as e:
                problems.append(e.reason)
        if problems:
            bad.append(BadRow(i, row.id, "; ".join(problems)))
        else:
            turns.append(len(row.turns))
    n_images = [_n_images(r) for r in records]
    stats: dict[str, Any] = {
        "rows": len(records), "bad_rows": len(bad), "with_image": sum(n > 0 for n in n_images),
        "text_only": sum(n == 0 for n in n_images), "multi_image": sum(n > 1 for n in n_images),
        "images": sum(n_images), "turns_per_row": _summary(turns),
    }
    if tokenizer is not None:
        stats["tokens"] = _summary(tokens)
        stats["trained_tokens"] = _summary(trained)
        stats["image_tokens"] = "from the model" if image_token_count else "1 per image"
        if max_length is not None:
            stats["longer_than_max_length"] = int(truncated)
    aspects = [round(max(w / h, h / w), 2) for w, h in zip(widths, heights)]
    stats["image_sizes"] = {"readable": len(widths), "width": _summary(widths), "height": _summary(heights),
                            "aspect": _summary(aspects)}
    return Report(bad, stats)
