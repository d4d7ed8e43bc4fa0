"""Bad data files and output paths (issue 21): one line naming the file, row or path, exit 2.

Every case writes a real file and runs the real command (`llava.cli.main`, or a subprocess where
the exit code and stderr of the module entry point matter). Training is stopped before the model
loads: `build_model` is replaced by a function that fails the test if it is ever reached.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llava.cli import main as llava_main
from llava.errors import DataError, LabelError, LlavaError, OutputPathError
from llava.processing.labels import build_example
from llava.train import loop
from llava.train.checkpointing import check_output_dir
from llava.train.data import SupervisedDataset, check_dataset, load_records, parse_record, read_rows
from llava.train.sampler import epoch_batches, steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "llava" / "assets" / "tiny-llava")
GOOD_CONV = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]


@pytest.fixture
def no_model(monkeypatch):
    """Training must fail on the data or the output path before it builds a model."""
    def build_model(cfg):
        raise AssertionError("the model was built before the data and output path were checked")

    monkeypatch.setattr(loop, "build_model", build_model)


def train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--stage", "finetune", "--model", MODEL, "--data", str(data), "--out", str(out),
            "--max-steps", "1", "--no-progress", *extra]


def error_of(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `llava ARGV`; a user error is exactly one line."""
    code = llava_main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1, err
    return code, err.strip()


# File-level problems: (file name, bytes, what the message must say after the file name) ---------
FILES = {
    "empty-list": ("a.json", b"[]", "no rows (the file holds an empty JSON list)"),
    "empty-file": ("a.json", b"", "the file is empty: no rows"),
    "blank-file": ("a.jsonl", b"\n  \n", "the file is empty: no rows"),
    "object": ("a.json", b'{"id": 1, "conversations": []}',
               "expected a JSON list of records (or JSON lines), got an object with keys ['conversations', 'id']"),
    "wrapper": ("a.json", b'{\n "data": [\n  {"id": 1}\n ]\n}', "got an object with keys ['data']"),
    "pretty-object-jsonl": ("a.jsonl", b'{\n "id": 1\n}', "got an object"),
    "number": ("a.json", b"5", "expected a JSON list of records (or JSON lines), got a number"),
    "string": ("a.json", b'"rows"', "got a string"),
    "null": ("a.json", b"null", "got null"),
    "boolean": ("a.json", b"true", "got a boolean"),
    "latin-1": ("a.json", '[{"id": "café"}]'.encode("latin-1"),
                "not UTF-8 text: byte 0xe9 at offset 12 (line 1, byte 13 of the line)"),
    "latin-1-line-3": ("a.jsonl", b'{"id": 1}\n{"id": 2}\n{"id": "\xe9"}\n',
                       "byte 0xe9 at offset 28 (line 3, byte 9 of the line)"),
    "binary": ("a.json", bytes(range(128, 256)) * 4, "not UTF-8 text: byte 0x80 at offset 0"),
    "utf-16": ("a.json", "[]".encode("utf-16"), "not UTF-8 text (it looks like UTF-16)"),
    "truncated": ("a.json", b'[\n  {"id": 1,\n   "conversations": [',
                  "invalid JSON at line 3, column 22: Expecting value (the file ends there: is it cut short?)"),
    "jsonl-bad-line": ("a.jsonl", b'{"id": 1}\n\n{"id": 2,}\n', "invalid JSON on line 3, column 10"),
    "deep": ("a.json", b"[" * 100_000, "invalid JSON: JSON nested too deeply"),
    "deep-jsonl": ("a.jsonl", b'{"id": 1}\n' + b"[" * 100_000 + b"\n", "invalid JSON on line 2"),
    "huge-int": ("a.json", b"[" + b"9" * 5000 + b"]", "invalid JSON: Exceeds the limit"),
}


@pytest.mark.parametrize("case", FILES)
def test_unusable_data_files_name_the_file(case, tmp_path, capsys, no_model):
    name, content, message = FILES[case]
    data = tmp_path / name
    data.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_rows(data)
    assert str(info.value).startswith(f"{data}: ") and message in str(info.value)
    code, err = error_of(["data", "check", str(data)], capsys)
    assert (code, err) == (2, f"llava data: error: {info.value}")
    code, err = error_of(train(data, tmp_path / "out"), capsys)
    assert (code, err) == (2, f"llava train: error: {info.value}")
    assert not (tmp_path / "out").exists()


def test_data_that_is_not_a_file(tmp_path, capsys, no_model):
    code, err = error_of(["data", "check", str(tmp_path)], capsys)
    assert code == 2 and f"{tmp_path}: cannot read the data file" in err
    code, err = error_of(["data", "check", str(tmp_path / "missing.json")], capsys)
    assert code == 2 and "missing.json" in err
    code, err = error_of(train(tmp_path / "missing.json", tmp_path / "out"), capsys)
    assert code == 2 and "missing.json" in err


def test_accepted_file_shapes(tmp_path):
    """What is not an error: one record as the one line of a .jsonl, a BOM, U+2028 inside a JSON line."""
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"id": "only", "conversations": GOOD_CONV}) + "\n")
    assert [r["id"] for r in load_records(one)] == ["only"]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"id": "b", "conversations": GOOD_CONV}]).encode())
    assert load_records(bom)[0]["id"] == "b"
    sep = tmp_path / "sep.jsonl"  # str.splitlines would cut these lines at U+2028 / U+0085
    rows = [{"id": f"s{i}", "conversations": [{"from": "human", "value": "a\u2028b\x85c"},
                                              {"from": "gpt", "value": "d\u2029e"}]} for i in range(2)]
    sep.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert load_records(sep) == rows
    assert check_dataset(sep, None).ok


def test_load_records_names_a_row_that_is_not_an_object(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"a.jsonl: row #1 is a list \(JSON array\), expected a JSON object"):
        load_records(data)
    assert read_rows(data) == [{"id": 1}, [1, 2]]  # kept, for per-row reports


# Rows: every problem reported per row, by id -----------------------------------------------------
ROWS = [
    (7, "record is a JSON number, expected an object"),
    ("text", "record is a JSON string, expected an object"),
    (None, "record is a JSON null, expected an object"),
    ([GOOD_CONV], "record is a JSON array, expected an object"),
    ({"id": "noconv"}, "missing or empty 'conversations'"),
    ({"id": "convstr", "conversations": "hi"}, "missing or empty 'conversations'"),
    ({"id": "convdict", "conversations": {"from": "human"}}, "missing or empty 'conversations'"),
    ({"id": "turnstr", "conversations": ["hi", "there"]}, "turn 0 is a JSON string, expected an object"),
    ({"id": "novalue", "conversations": [{"from": "human"}, GOOD_CONV[1]]}, "turn 0 needs a string 'value' (missing)"),
    ({"id": "numvalue", "conversations": [{"from": "human", "value": 3}, GOOD_CONV[1]]},
     "turn 0 needs a string 'value' (a JSON number)"),
    ({"id": "nofrom", "conversations": [{"value": "q"}, GOOD_CONV[1]]}, "turn 0 has unknown role None"),
    ({"id": "numfrom", "conversations": [{"from": 1, "value": "q"}, GOOD_CONV[1]]}, "turn 0 has unknown role 1"),
    ({"id": "system", "conversations": [{"from": "system", "value": "s"}] + GOOD_CONV},
     "turn 0 has unknown role 'system'"),
    ({"id": "hugerole", "conversations": [{"from": "x" * 10**6, "value": "q"}, GOOD_CONV[1]]},
     "turn 0 has unknown role 'xxxxxxxx"),
    ({"id": "imgnum", "image": 3, "conversations": GOOD_CONV}, "'image' must be a file name or a list of file names"),
    ({"id": "imglist", "image": ["a.png", 2], "conversations": GOOD_CONV}, "'image' must be a file name"),
    ({"id": "imgempty", "image": "", "conversations": GOOD_CONV}, "'image' must be a file name"),
    ({"id": "surrogate", "conversations": [{"from": "human", "value": "a\ud800"}, GOOD_CONV[1]]},
     "turn 0 holds an unpaired surrogate"),
    ({"id": "gpttag", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}]},
     "turn 1 (gpt) contains <image>"),
    ({"id": "hugegpt", "conversations": [{"from": "human", "value": "q"},
                                         {"from": "gpt", "value": "<image>" + "y" * 10**6}]},
     "turn 1 (gpt) contains <image>"),
    ({"id": "notimage", "conversations": [{"from": "human", "value": "<image> q"}, GOOD_CONV[1]]},
     "1 <image> tag(s) but no image"),
    ({"id": "twotags", "image": "a.png", "conversations": [{"from": "human", "value": "<image><image>"},
                                                           GOOD_CONV[1]]}, "more <image> tags (2) than images (1)"),
    ({"id": "onlygpt", "conversations": [GOOD_CONV[1]]}, "no human/gpt pair to train on"),
    ({"id": "x" * 500, "conversations": []}, "missing or empty 'conversations'"),
    ({"id": "a\nb", "conversations": []}, "missing or empty 'conversations'"),
]


def test_every_bad_row_is_reported_by_id(tmp_path, capsys, tiny_tok):
    data = tmp_path / "rows.json"
    records = [{"id": "good", "conversations": GOOD_CONV}] + [rec for rec, _ in ROWS]
    data.write_text(json.dumps(records))  # \ud800 is written as an escape: the file is valid UTF-8
    report = check_dataset(data, tmp_path, tiny_tok, "vicuna_v1")
    assert [b.index for b in report.bad_rows] == list(range(1, len(records)))
    for bad, (rec, reason) in zip(report.bad_rows, ROWS):
        assert reason in bad.reason, (rec, bad.reason)
        assert len(bad.reason) < 400 and len(bad.id) <= 60 and bad.id.isprintable()
    code = llava_main(["data", "check", str(data), "--tokenizer", MODEL, "--template", "vicuna_v1"])
    out = capsys.readouterr().out
    assert code == 1 and f"{len(ROWS)} bad row(s) of {len(records)}" in out
    assert "row 'a\\nb' (#" in out and "row 'xxxxx" in out  # odd ids are quoted, long ones cut

    dataset = SupervisedDataset(data, tiny_tok, "vicuna_v1", image_token_index=-200)
    assert dataset[0]["id"] == "good" and len(dataset.lengths) == len(records)
    for i, (rec, reason) in enumerate(ROWS, 1):
        with pytest.raises(DataError, match="row .*" + re.escape(reason[:20])):
            dataset[i]


def test_all_bad_rows_refuse_training_before_the_model_loads(tmp_path, capsys, no_model):
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"id": "a"}, 5, {"id": "c", "conversations": [GOOD_CONV[1]]}]))
    code, err = error_of(train(data, tmp_path / "out"), capsys)
    assert code == 2
    assert err == (f"llava train: error: {data}: none of the 3 rows can be trained on (see `llava data check "
                   f"{data}`): row a: missing or empty 'conversations'; row #1: record is a JSON number, expected "
                   "an object; row c: no human/gpt pair to train on")


def test_inspect_shows_a_non_record_row_as_its_error(tmp_path, capsys):
    data = tmp_path / "a.json"
    data.write_text(json.dumps([{"id": "ok", "conversations": GOOD_CONV}, [1]]))
    code = llava_main(["data", "inspect", str(data), "--tokenizer", MODEL, "--template", "vicuna_v1", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and "input_ids" in rows[0] and rows[1]["error"] == "record is a JSON array, expected an object"


def test_bad_arguments_of_data_commands(tmp_path, capsys):
    data = tmp_path / "a.json"
    data.write_text(json.dumps([{"id": "ok", "conversations": GOOD_CONV}]))
    code, err = error_of(["data", "check", str(data), "--tokenizer", str(tmp_path)], capsys)
    assert code == 2 and f"--tokenizer {tmp_path}: cannot load a tokenizer" in err
    code, err = error_of(["data", "inspect", str(data), "--tokenizer", MODEL, "--template", "nope"], capsys)
    assert code == 2 and "unknown conversation template 'nope'" in err
    with pytest.raises(SystemExit) as info:
        llava_main(["data", "check", str(data), "--max-length", "0"])
    assert info.value.code == 2 and "expected a positive whole number, got 0" in capsys.readouterr().err


# Output paths ------------------------------------------------------------------------------------
def test_output_under_a_file_fails_before_the_model_loads(tmp_path, capsys, no_model):
    data = tmp_path / "a.json"
    data.write_text(json.dumps([{"id": "ok", "conversations": GOOD_CONV}]))
    (tmp_path / "results.json").write_text("{}")
    out = tmp_path / "results.json" / "run" / "1"
    with pytest.raises(OutputPathError, match=f"output folder {out} cannot be created: {tmp_path / 'results.json'} "
                                              "is a file, not a folder"):
        check_output_dir(str(out))
    code, err = error_of(train(data, out), capsys)
    assert code == 2 and err.endswith(f"{tmp_path / 'results.json'} is a file, not a folder")
    code, err = error_of(train(data, tmp_path / "results.json"), capsys)
    assert code == 2 and err.endswith("exists and is a file, not a folder")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_output_in_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(OutputPathError, match="no write permission in"):
            check_output_dir(str(locked / "run"))
    finally:
        locked.chmod(0o700)


def test_module_entry_points_print_one_line(tmp_path, capsys, no_model):
    """`python -m llava.train` (what torchrun runs) and the original flags: exit 2, one line, no traceback."""
    data = tmp_path / "a.json"
    data.write_text("[]")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "llava.train", *train(data, tmp_path / "o")[1:]],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 2 and run.stderr == f"llava train: error: {data}: no rows (the file holds an empty " \
                                                 "JSON list)\n"
    from llava.train.train import main as original_main

    assert original_main(["--model_name_or_path", MODEL, "--data_path", str(data), "--output_dir",
                          str(tmp_path / "o"), "--max_steps", "1"]) == 2
    assert capsys.readouterr().err == f"llava.train.train: error: {data}: no rows (the file holds an empty JSON list)\n"
    from llava.train.data_cli import main as data_main

    assert data_main(["data", "check", str(data)]) == 2
    assert capsys.readouterr().err.startswith("llava data check: error: ")


# The layers below the commands -------------------------------------------------------------------
def test_sampler_refuses_no_rows():
    for call in (lambda: steps_per_epoch(0, 4), lambda: epoch_batches(0, 4, seed=0, epoch=0)):
        with pytest.raises(DataError, match="the dataset has no rows"):
            call()
    with pytest.raises(LlavaError, match="global batch size must be positive"):
        steps_per_epoch(3, 0)


def test_build_example_raises_only_label_errors(tiny_tok):
    for turns in (["q"], ["q", " "], ["q", "<image>"], ["q", 3], [], ["q", "a", "q2"]):
        with pytest.raises(LabelError):
            build_example(tiny_tok, "vicuna_v1", turns, [], -200)
    with pytest.raises(LabelError, match="one human and one gpt turn"):
        build_example(tiny_tok, "plain", ["q", "a", "q", "a"], [], -200)
    with pytest.raises(LlavaError):
        build_example(tiny_tok, "vicuna_v1", ["q", "a"], [], -200, convention="nope")
    row, problems = parse_record({"conversations": GOOD_CONV, "image": ["a.png"]}, 0)
    assert problems == [] and row.turns[0].startswith("<image>\n")


def test_a_bad_row_in_a_loader_worker_keeps_its_own_message(tmp_path, tiny_tok):
    """`--num-workers N`: torch re-raises a worker's error with the worker's traceback as its message."""
    from torch.utils.data import DataLoader

    from llava.train.data import worker_error

    records = [{"id": "row-7", "image": "missing.png", "conversations": GOOD_CONV}]
    ds = SupervisedDataset(records, tiny_tok, "vicuna_v1", image_token_index=-200, image_token_count=lambda s: 1,
                           image_processor=lambda images: ([], []), image_folder=str(tmp_path))
    with pytest.raises(DataError) as info:
        next(iter(DataLoader(ds, batch_size=1, num_workers=1, collate_fn=lambda batch: batch)))
    assert "Traceback" in str(info.value)
    err = worker_error(info.value)
    assert type(err) is DataError and str(err) == f"row row-7: image file not found: {tmp_path / 'missing.png'}"
    assert worker_error(err) is err
