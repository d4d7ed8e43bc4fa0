"""Fuzzing the training-data path: records of any JSON shape, roles, `<image>` tags, unicode and huge
strings end in a result or a `LlavaError` (`DataError` / `LabelError` for the data), never another
exception and never a hang.

Covered: `parse_record`, `validate_record`, `build_example` (the bundled model's tokenizer, several
templates, both tag conventions, truncation), `SupervisedDataset` items, and files written from
the generated data (JSON list, JSON lines, then cut or corrupted) through `read_rows`,
`load_records`, `check_dataset` and `llava data check`.

A few dozen examples per test in CI, the same every run; the long run draws new ones:
    LLAVA_FUZZ=long python -m pytest -q tests/test_fuzz_data.py
(profiles in tests/conftest.py). Each example has a 2 s deadline here, so a hang fails.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import PIL.Image
import pytest
import torch
from fuzz_helpers import outcome
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava.cli import main as llava_main
from llava.errors import DataError, LlavaError
from llava.processing.labels import IGNORE_INDEX, build_example
from llava.processing.tokenize import IMAGE_TAG
from llava.train.data import (
    SupervisedDataset,
    check_dataset,
    load_records,
    parse_record,
    read_rows,
    validate_record,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "llava" / "assets" / "tiny-llava"
TEMPLATES = ["vicuna_v1", "plain", "llama_2", "mistral_instruct", "chatml_direct", "v0", "llava_v0"]
IMAGE_NAMES = ["a.png", "b.png", "missing.png", "broken.png", "", "../a.png", "sub/", "\x00.png"]
fuzz = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Image folder: two real images and one file that is not an image."""
    root = tmp_path_factory.mktemp("fuzz-images")
    PIL.Image.new("RGB", (12, 8), "red").save(root / "a.png")
    PIL.Image.new("RGB", (5, 30), "blue").save(root / "b.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root



# Strategies ------------------------------------------------------------------------------------
UNICODE = ["é", "😀", "\u2028", "\x85", "\r\n", "\t", "\x00", "\ufeff", "ß", "İ", "\u200b"]
SURROGATES = ["\ud800", "\udfff"]  # valid in a JSON file as escapes, but not text any tokenizer takes
unicode_bits = st.sampled_from(UNICODE + SURROGATES)
markup = st.sampled_from([IMAGE_TAG, "<image", "image>", "<Image>", "</s>", "<s>", "<unk>", "<pad>", "USER:",
                          "ASSISTANT:", "###", "[INST]", "[/INST]", "<<SYS>>", "<|im_start|>", "<|im_end|>", "\n",
                          " ", ""])
huge = st.builds(lambda piece, n: piece * n, st.sampled_from(["x", "word ", "é😀", "<image>", " \n"]),
                 st.integers(1_000, 8_000))
text = st.lists(st.one_of(st.text(max_size=20), markup, unicode_bits), max_size=8).map("".join)
text_or_huge = st.one_of(text, text, text, huge)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                   st.text(max_size=10))
any_json = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)
role = st.one_of(st.sampled_from(["human", "gpt", "user", "assistant", "HUMAN", "Gpt", "system", "", "bot"]),
                 any_json)
turn = st.one_of(
    st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt"]), "value": text_or_huge}),
    st.fixed_dictionaries({}, optional={"from": role, "value": st.one_of(text_or_huge, any_json)}),
    any_json,
)
alternating = st.lists(text_or_huge, min_size=1, max_size=6).map(
    lambda values: [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)])
image = st.one_of(st.sampled_from(IMAGE_NAMES), st.lists(st.sampled_from(IMAGE_NAMES), max_size=3), any_json)

# Records that are usable (or nearly): the deep end of the path (tags, templates, truncation) runs.
clean_text = st.lists(st.one_of(st.text(max_size=20), markup.filter(lambda m: m != IMAGE_TAG),
                                st.sampled_from(UNICODE)), max_size=6).map("".join).map(
    lambda s: s.replace(IMAGE_TAG, "<img>") if s.strip() else s + "x")
clean_or_huge = st.one_of(clean_text, clean_text, clean_text,
                          st.builds(lambda piece, n: piece * n, st.sampled_from(["x", "word ", "é😀 "]),
                                    st.integers(1_000, 8_000)))


@st.composite
def usable_record(draw) -> dict:
    """A record parse_record accepts: alternating turns, one tag per image (one image: any or none)."""
    n_pairs = draw(st.integers(1, 3))
    values = [draw(clean_or_huge) for _ in range(2 * n_pairs)]
    images = draw(st.sampled_from([[], ["a.png"], ["b.png"], ["a.png", "b.png"], ["b.png", "a.png", "b.png"]]))
    for _ in range(len(images) if len(images) > 1 else draw(st.integers(0, len(images)))):
        j = draw(st.sampled_from(range(0, len(values), 2)))
        at = draw(st.integers(0, len(values[j])))
        tagged = values[j][:at] + IMAGE_TAG + draw(st.sampled_from(["", "\n", " "])) + values[j][at:]
        one_more = tagged.count(IMAGE_TAG) == values[j].count(IMAGE_TAG) + 1  # not inside another tag
        values[j] = tagged if one_more else values[j] + IMAGE_TAG
    user, bot = draw(st.sampled_from([("human", "gpt"), ("user", "assistant"), ("HUMAN", "GPT")]))
    conv = [{"from": (user, bot)[i % 2], "value": v} for i, v in enumerate(values)]
    if draw(st.booleans()):
        conv.insert(0, {"from": bot, "value": draw(clean_text)})  # dropped, as in the original
    if draw(st.booleans()):
        conv.append({"from": user, "value": draw(clean_text)})  # unanswered: dropped
    rec: dict = {"id": draw(st.one_of(st.text(max_size=12), st.integers())), "conversations": conv}
    if images:
        rec["image"] = images[0] if len(images) == 1 and draw(st.booleans()) else images
    return rec


record = st.one_of(
    usable_record(), usable_record(),
    st.fixed_dictionaries({"id": st.one_of(st.text(max_size=8), st.integers()), "conversations": alternating},
                          optional={"image": image}),
    st.fixed_dictionaries({}, optional={"id": any_json, "image": image,
                                        "conversations": st.one_of(st.lists(turn, max_size=5), any_json)}),
    any_json,
)


# Records ---------------------------------------------------------------------------------------
@fuzz
@given(rec=record, template=st.sampled_from(TEMPLATES), convention=st.sampled_from(["original", "hf"]),
       max_length=st.one_of(st.none(), st.integers(1, 400)))
def test_records_parse_validate_and_build(tok, folder, rec, template, convention, max_length):
    row, problems = parse_record(rec, 3)
    assert isinstance(row.id, str) and row.id.isprintable() and len(row.id) <= 60
    assert all(isinstance(p, str) and p for p in problems)
    checked = validate_record(rec, folder, index=3)
    assert all(isinstance(p, str) for p in checked) and checked[:len(problems)] == problems
    if problems:
        return
    assert len(row.turns) % 2 == 0 and all(isinstance(t, str) for t in row.turns)
    assert sum(t.count(IMAGE_TAG) for t in row.turns) == len(row.images)
    counts = [1 + i for i in range(len(row.images))]
    result = outcome(lambda: build_example(tok, template, row.turns, counts, -200, convention, max_length,
                                            row_id=row.id))
    if isinstance(result, LlavaError):
        assert isinstance(result, DataError)  # LabelError: the row, named
        return
    ids, labels = result
    assert len(ids) == len(labels) and any(label != IGNORE_INDEX for label in labels)
    assert max_length is None or len(ids) <= max_length
    assert all(label == IGNORE_INDEX for i, label in zip(ids, labels) if i == -200)


@fuzz
@given(rec=usable_record(), template=st.sampled_from(TEMPLATES), convention=st.sampled_from(["original", "hf"]))
def test_usable_records_are_accepted(tok, folder, rec, template, convention):
    """The other side: a well-formed row is never refused, and its images get their placeholders."""
    row, problems = parse_record(rec, 0)
    assert problems == [] and validate_record(rec, folder) == []
    counts = [2 + i for i in range(len(row.images))]
    if template == "plain" and len(row.turns) != 2:
        return
    ids, labels = build_example(tok, template, row.turns, counts, -200, convention, row_id=row.id)
    assert ids.count(-200) == sum(counts) and any(label != IGNORE_INDEX for label in labels)


@fuzz
@given(turns=st.lists(st.one_of(text_or_huge, any_json), max_size=6), template=st.sampled_from(TEMPLATES),
       convention=st.sampled_from(["original", "hf"]), counts=st.lists(st.integers(0, 5), max_size=3),
       max_length=st.one_of(st.none(), st.integers(1, 300)))
def test_build_example_takes_any_turns(tok, turns, template, convention, counts, max_length):
    """Turns straight from a caller, not normalised by parse_record: still a result or a LlavaError."""
    result = outcome(lambda: build_example(tok, template, turns, counts, -200, convention, max_length))
    assert isinstance(result, (tuple, LlavaError))


def _image_processor(images):
    return [torch.zeros(3, 4, 4) for _ in images], [im.size for im in images]


@fuzz
@given(records=st.lists(record, min_size=1, max_size=4), convention=st.sampled_from(["original", "hf"]))
def test_dataset_items(tok, folder, records, convention):
    ds = SupervisedDataset(records, tok, "vicuna_v1", image_token_index=-200, image_token_count=lambda size: 2,
                           image_processor=_image_processor, image_folder=folder, convention=convention,
                           max_length=256)
    assert len(ds.lengths) == len(ds.modality_lengths) == len(records)
    for i in range(len(ds)):
        item = outcome(lambda i=i: ds[i])
        assert isinstance(item, (dict, DataError)), item


# Files -----------------------------------------------------------------------------------------
def _serialise(rows: list, fmt: str, ascii_only: bool) -> bytes:
    if fmt == "jsonl":
        text = "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in rows)
    else:
        text = json.dumps(rows, ensure_ascii=ascii_only, indent=1 if fmt == "pretty" else None)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate unescaped: bytes that are not UTF-8


damage = st.one_of(
    st.none(),
    st.tuples(st.just("cut"), st.floats(0, 1)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("replace"), st.sampled_from([b"", b"\n", b"[]", b"{}", b"5", b"null", b'"x"', b"\xff\xfe"])),
)


def _damage(raw: bytes, how) -> bytes:
    if how is None:
        return raw
    if how[0] == "cut":
        return raw[:int(len(raw) * how[1])]
    if how[0] == "insert":
        at = int(len(raw) * how[1])
        return raw[:at] + how[2] + raw[at:]
    return how[1]


@fuzz
@given(rows=st.lists(record, max_size=3), fmt=st.sampled_from(["json", "pretty", "jsonl"]),
       ascii_only=st.booleans(), how=damage)
def test_data_files(tok, folder, rows, fmt, ascii_only, how):
    path = folder / f"data.{'jsonl' if fmt == 'jsonl' else 'json'}"
    path.write_bytes(_damage(_serialise(rows, fmt, ascii_only), how))
    read = outcome(lambda: read_rows(path))
    assert isinstance(read, (list, DataError)) and read != []
    one_array_line = fmt == "jsonl" and len(rows) == 1 and isinstance(rows[0], list)  # reads as a JSON list
    if how is None and rows and ascii_only and not one_array_line:
        assert read == json.loads(json.dumps(rows)), "an undamaged file must read back as written"
    loaded = outcome(lambda: load_records(path))
    assert isinstance(loaded, DataError) or all(isinstance(r, dict) for r in loaded)
    report = outcome(lambda: check_dataset(path, folder, tok, "vicuna_v1", max_length=200))
    plain = outcome(lambda: check_dataset(path, folder))
    if isinstance(read, DataError):
        assert isinstance(report, DataError) and str(report) == str(plain) == str(read)
    else:
        assert len(report.bad_rows) <= report.stats["rows"] == len(read)
        assert {b.index for b in plain.bad_rows} <= {b.index for b in report.bad_rows}
        json.dumps(report.to_dict())
        report.format().encode("utf-8")  # printable: no lone surrogate from a row reaches the output
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = llava_main(["data", "check", str(path), "--image-folder", str(folder)])
    assert code == (2 if isinstance(read, DataError) else 0 if plain.ok else 1), err.getvalue()
    if code == 2:
        assert err.getvalue().count("\n") == 1 and str(path) in err.getvalue()
    out.getvalue().encode("utf-8")
