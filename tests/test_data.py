"""The training data path: records -> dataset items -> batches, the checker and the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

from llava.processing.image import ImageProcessor
from llava.processing.labels import IGNORE_INDEX
from llava.tiny import tiny_model
from llava.train import data_cli
from llava.train.data import (
    DataError,
    SupervisedDataset,
    check_dataset,
    collate,
    load_records,
    parse_record,
    validate_record,
)

ROOT = Path(__file__).resolve().parents[1]


def conv(*values: str, first: str = "human") -> list[dict]:
    roles = ("human", "gpt") if first == "human" else ("gpt", "human")
    return [{"from": roles[i % 2], "value": v} for i, v in enumerate(values)]


GOOD = [
    {"id": "text", "conversations": conv("Say hi.", "Hi!", "Again?", "Hi again!")},
    {"id": "one", "image": "square.png", "conversations": conv("What is shown?\n<image>", "A red square.")},
    {"id": "notag", "image": "wide.png", "conversations": conv("Describe it.", "A wide red bar.")},
    {"id": "two", "image": ["square.png", "tall.png"],
     "conversations": conv("<image>\nLeft. <image>\nRight. Same?", "No.")},
    {"id": "leadgpt", "image": "tall.png", "conversations": conv("Hello!", "<image>\nWhat now?", "A tall bar.",
                                                                 first="gpt")},
]
BAD = [
    {"id": "roles", "conversations": conv("Q?", "A.") + [{"from": "gpt", "value": "again"}]},
    {"id": "missing", "image": "nope.png", "conversations": conv("<image>\nQ?", "A.")},
    {"id": "broken", "image": "broken.png", "conversations": conv("<image>\nQ?", "A.")},
    {"id": "tags", "image": "square.png", "conversations": conv("<image>\n<image>\nQ?", "A.")},
    {"id": "empty", "conversations": conv("Q?", "  ")},
    {"id": "multi", "image": ["square.png", "wide.png"], "conversations": conv("<image>\nQ?", "A.")},
]
BAD_REASONS = {"roles": "roles do not alternate", "missing": "image file not found",
               "broken": "not a readable image", "tags": "more <image> tags (2) than images (1)",
               "empty": "turn 1 (gpt) is empty", "multi": "1 <image> tag(s) for 2 images"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    PIL.Image.new("RGB", (28, 28), (200, 20, 20)).save(d / "square.png")
    PIL.Image.new("RGB", (100, 30), (20, 200, 20)).save(d / "wide.png")
    PIL.Image.new("RGB", (40, 90), (20, 20, 200)).save(d / "tall.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (d / "good.json").write_text(json.dumps(GOOD, ensure_ascii=False))
    (d / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in GOOD + BAD) + "\n")
    return d


@pytest.fixture(scope="module")
def anyres():
    """A tiny anyres model: different image sizes give different placeholder counts."""
    model, tok = tiny_model("tiny-anyres")
    processor = ImageProcessor(crop_size=28, aspect="anyres", pinpoints=model.config.image_grid_pinpoints)
    return model, tok, processor


def make_dataset(path, folder, anyres, **kw) -> SupervisedDataset:
    model, tok, processor = anyres
    return SupervisedDataset(path, tok, "vicuna_v1", image_token_index=model.config.image_token_index,
                             image_token_count=model.image_token_count, image_processor=processor,
                             image_folder=folder, **kw)


def test_load_records_json_and_jsonl(folder, tmp_path):
    assert load_records(folder / "good.json") == GOOD
    assert [r["id"] for r in load_records(folder / "mixed.jsonl")] == [r["id"] for r in GOOD + BAD]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n\n{"id": 2,}\n')
    with pytest.raises(DataError, match="invalid JSON on line 3"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text('[\n  {"id": 1},\n  {"id": 2\n]')
    with pytest.raises(DataError, match="invalid JSON at line 4"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text('[{"id": 1}, 7]')
    with pytest.raises(DataError, match="item 1 is a int"):
        load_records(tmp_path / "list.json")


def test_parse_record_normalises_like_the_original():
    rows = {r["id"]: parse_record(r, i) for i, r in enumerate(GOOD)}
    assert all(problems == [] for _, problems in rows.values())
    assert rows["one"][0].turns[0] == "<image>\nWhat is shown?"  # tag moved to the front
    assert rows["notag"][0].turns[0] == "<image>\nDescribe it."  # missing tag inserted
    assert rows["two"][0].turns[0] == "<image>\nLeft. <image>\nRight. Same?"  # several: left in place
    assert rows["leadgpt"][0].turns == ["<image>\nWhat now?", "A tall bar."]  # leading gpt dropped
    row, problems = parse_record({"conversations": conv("Q?", "A.", "Unanswered?")}, 4)
    assert (row.id, row.turns, problems) == ("#4", ["Q?", "A."], [])
    assert parse_record({"id": "x"}, 0)[1] == ["missing or empty 'conversations'"]
    assert "unknown role 'system'" in parse_record({"conversations": [{"from": "system", "value": "s"}]})[1][0]


def test_validate_record_reports_each_problem(folder):
    for rec in BAD:
        problems = validate_record(rec, folder)
        assert len(problems) == 1 and BAD_REASONS[rec["id"]] in problems[0], (rec["id"], problems)
    assert validate_record(GOOD[1], folder) == []
    assert validate_record(BAD[1], folder, check_images=False) == []


def test_dataset_items_anyres_mix(folder, anyres):
    model, tok, _ = anyres
    ds = make_dataset(folder / "good.json", folder, anyres)
    assert len(ds) == len(GOOD)
    items = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    index = model.config.image_token_index
    text = items["text"]
    assert text["pixel_values"] == [] and text["image_sizes"] == []
    assert [tok.decode(text["input_ids"][text["labels"] != IGNORE_INDEX])] == [" Hi!</s> Hi again!</s>"]
    for name, sizes in {"one": [(28, 28)], "notag": [(100, 30)], "two": [(28, 28), (40, 90)],
                        "leadgpt": [(40, 90)]}.items():
        item = items[name]
        assert item["image_sizes"] == sizes
        counts = [model.image_token_count(s) for s in sizes]
        assert int((item["input_ids"] == index).sum()) == sum(counts)
        assert len(set(counts)) == len(counts)  # anyres: each size its own count
        assert (item["labels"][item["input_ids"] == index] == IGNORE_INDEX).all()
        for pixels in item["pixel_values"]:
            assert pixels.shape[1:] == (3, 28, 28) and pixels.shape[0] >= 3  # base + tiles
        assert item["input_ids"].dtype == torch.long and item["labels"].shape == item["input_ids"].shape


def test_collate_and_a_training_forward(folder, anyres):
    model, tok, _ = anyres
    ds = make_dataset(folder / "good.json", folder, anyres)
    items = [ds[i] for i in range(len(ds))]
    batch = collate(items, pad_token_id=tok.pad_token_id)
    width = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (5, width)
    for b, item in enumerate(items):
        n = len(item["input_ids"])
        assert batch["attention_mask"][b].sum() == n
        assert (batch["input_ids"][b, n:] == tok.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["labels"][b, :n], item["labels"])
    assert batch["image_sizes"] == [(28, 28), (100, 30), (28, 28), (40, 90), (40, 90)]  # row order
    assert len(batch["pixel_values"]) == 5 and batch["ids"] == [it["id"] for it in items]
    out = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
                attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="max_length=10"):
        collate(items, pad_token_id=tok.pad_token_id, max_length=10)


def test_dataset_truncation_and_lengths(folder, anyres):
    model = anyres[0]
    full = make_dataset(folder / "good.json", folder, anyres)
    text, one = full[0], full[1]
    first_answer_end = int((text["labels"] != IGNORE_INDEX).nonzero()[0]) + 4
    ds = make_dataset(folder / "good.json", folder, anyres, max_length=first_answer_end)
    assert torch.equal(ds[0]["input_ids"], text["input_ids"][:first_answer_end])
    image_start = int((one["input_ids"] == model.config.image_token_index).nonzero()[0])
    ds = make_dataset(folder / "good.json", folder, anyres, max_length=image_start + 2)
    with pytest.raises(DataError, match=rf"row one: .*max_length={image_start + 2} would cut image 1 of 1"):
        ds[1]
    # words of all raw turns (tags and a dropped leading gpt turn included, as the original counts)
    assert ds.lengths == [6, 7 + 128, 6 + 128, 6 + 256, 7 + 128]
    assert ds.modality_lengths == [-6, 7 + 128, 6 + 128, 6 + 256, 7 + 128]


def test_bad_rows_raise_in_the_dataset_and_are_all_reported(folder, anyres):
    model, tok, _ = anyres
    ds = make_dataset(folder / "mixed.jsonl", folder, anyres)
    for i, rec in enumerate(GOOD + BAD):
        if rec in BAD:
            with pytest.raises(DataError, match=f"row {rec['id']}: .*{re.escape(BAD_REASONS[rec['id']])}"):
                ds[i]
        else:
            assert ds[i]["id"] == rec["id"]
    report = check_dataset(folder / "mixed.jsonl", folder, tok, "vicuna_v1",
                           image_token_count=model.image_token_count)
    assert not report.ok
    assert {b.id: b.index for b in report.bad_rows} == {r["id"]: len(GOOD) + k for k, r in enumerate(BAD)}
    for bad in report.bad_rows:
        assert BAD_REASONS[bad.id] in bad.reason
    s = report.stats
    assert (s["rows"], s["bad_rows"], s["with_image"], s["text_only"], s["multi_image"]) == (11, 6, 8, 3, 2)
    assert s["turns_per_row"] == {"min": 2, "mean": 2.4, "max": 4}
    assert s["tokens"]["max"] > 40 and s["image_tokens"] == "from the model"
    assert s["image_sizes"]["width"] == {"min": 28, "mean": 49.0, "max": 100}


def test_check_dataset_clean_file_and_max_length(folder, anyres):
    _, tok, _ = anyres
    report = check_dataset(folder / "good.json", folder)
    assert report.ok and report.stats["rows"] == 5 and "tokens" not in report.stats
    report = check_dataset(folder / "good.json", folder, tok, "vicuna_v1", max_length=40)
    assert report.stats["longer_than_max_length"] >= 1
    assert all("max_length=40" in b.reason for b in report.bad_rows)


# -- the CLI --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(anyres, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok")
    anyres[1].save_pretrained(path)
    return str(path)


def test_cli_check(folder, tok_dir, capsys):
    code = data_cli.main(["data", "check", str(folder / "mixed.jsonl"), "--image-folder", str(folder),
                          "--tokenizer", tok_dir, "--template", "vicuna_v1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and not out["ok"]
    assert sorted(b["id"] for b in out["bad_rows"]) == sorted(BAD_REASONS)
    assert out["stats"]["image_tokens"] == "1 per image"
    assert data_cli.main(["data", "check", str(folder / "good.json"), "--image-folder", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "0 bad row(s) of 5" in text and "multi_image: 1" in text


def test_cli_inspect_json(folder, tok_dir, anyres, capsys):
    _, tok, _ = anyres
    code = data_cli.main(["data", "inspect", str(folder / "mixed.jsonl"), "--tokenizer", tok_dir,
                          "--template", "vicuna_v1", "--rows", "0-1,8", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # row 8 is bad
    assert [r["index"] for r in rows] == [0, 1, 8] and "tags" == rows[2]["id"] and "error" in rows[2]
    one = rows[1]
    assert one["id"] == "one" and one["text"].endswith("USER: <image>\nWhat is shown? ASSISTANT: A red square.</s>")
    assert one["input_ids"].count(-200) == 1  # one placeholder per image without a model
    assert one["trained"] == [" A red square.</s>"]
    assert [t for t, label in zip(one["input_ids"], one["labels"]) if label != IGNORE_INDEX] == \
        tok(" A red square.</s>", add_special_tokens=False).input_ids
    assert data_cli.main(["data", "inspect", str(folder / "good.json"), "--tokenizer", tok_dir,
                          "--template", "plain", "--rows", "1"]) == 0
    assert "--- trained: ['A red square.\\n']" in capsys.readouterr().out


def test_cli_inspect_with_model_counts(folder, anyres, monkeypatch, capsys):
    model, tok, _ = anyres
    monkeypatch.setattr(data_cli, "_load_model", lambda path: (model, tok, "vicuna_v1"))
    assert data_cli.main(["data", "inspect", str(folder / "good.json"), "--model", "stub", "--image-folder",
                          str(folder), "--rows", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    expected = model.image_token_count((28, 28)) + model.image_token_count((40, 90))
    assert row["input_ids"].count(model.config.image_token_index) == expected


def test_cli_errors_and_module_entry_point(folder, tok_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    run = subprocess.run([sys.executable, "-m", "llava.train.data_cli", "data", "inspect", str(folder / "good.json"),
                          "--tokenizer", tok_dir, "--template", "vicuna_v1", "--rows", "7"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "row(s) [7] out of range; the file has 5 rows" in run.stderr
    assert data_cli.main(["data", "inspect", str(folder / "good.json"), "--template", "vicuna_v1"]) == 2
