"""Benchmark answering (`llava.eval.model_vqa*`) and `llava batch`: batched, resumable, crash-safe.

Why these tests: the point of answering at scale is that batching changes nothing (batch 4 gives
the batch-1 answers at temperature 0), and that a run killed with SIGKILL and rerun ends with
exactly one answer per question, the same answers an uninterrupted run gives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llava
from llava.errors import DataError, ImageNotFound
from llava.eval.answering import AnswerJob, read_questions, run_answering
from llava.eval.resume import open_rows, read_rows

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["circles.png", "color.png", "shape.png", "word_cat.png", "shapes.png", "two_circles.png"]
QUESTIONS = ["What is shown?", "How many shapes are there?", "What color is it?", "Describe the image."]
GREEDY = {"temperature": 0.0, "max_new_tokens": 12}
ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]


@pytest.fixture(scope="module")
def pipe():
    return llava.load(device="cpu")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for name in EXAMPLES:
        shutil.copy(ROOT / "examples" / name, images / name)
    return images


def write_questions(path: Path, n: int, prefix: str = "") -> Path:
    with open(path, "w") as f:
        f.writelines(json.dumps({"question_id": f"{prefix}{i}", "image": EXAMPLES[i % len(EXAMPLES)],
                                "text": QUESTIONS[i % len(QUESTIONS)] + "\nAnswer briefly.", "category": "c"}) + "\n" for i in range(n))
    return path


def answers(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [row["question_id"] for row in rows]
    assert len(ids) == len(set(ids)), "a question answered twice"
    return {row["question_id"]: row["text"] for row in rows}


def run_inprocess(pipe, qfile: Path, folder: Path, out: Path, batch_size: int = 1) -> dict:
    job = AnswerJob(answers_file=out, batch_size=batch_size, sampling=GREEDY, model_id="tiny")
    run_answering(read_questions(qfile, folder), job, load=lambda: pipe)
    return answers(out)


def cli(module: str, *args: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=180)
    return proc.returncode, err


def kill_when_lines(proc: subprocess.Popen, path: Path, lines: int, total: int) -> None:
    """SIGKILL `proc` as soon as `path` has `lines` rows; fails if the run ended first."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert path.read_bytes().count(b"\n") < total, "the run finished before it could be killed"
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or stalled before writing {lines} rows: {finish(proc)}")


def test_batched_answers_equal_batch_one_and_have_the_original_shape(pipe, folder, tmp_path):
    qfile = write_questions(tmp_path / "q.jsonl", 10)
    one = run_inprocess(pipe, qfile, folder, tmp_path / "a1.jsonl", batch_size=1)
    four = run_inprocess(pipe, qfile, folder, tmp_path / "a4.jsonl", batch_size=4)
    assert one == four and len(one) == 10
    rows = [json.loads(line) for line in (tmp_path / "a4.jsonl").read_text().splitlines()]
    assert [list(r) for r in rows] == [ANSWER_KEYS] * 10
    assert [r["question_id"] for r in rows] == [str(i) for i in range(10)]
    assert rows[3]["prompt"] == QUESTIONS[3] + "\nAnswer briefly."  # the raw question text, as the original
    assert len({r["answer_id"] for r in rows}) == 10 and all(len(r["answer_id"]) == 22 for r in rows)
    assert all(r["metadata"] == {} and r["model_id"] == "tiny" and r["text"] == r["text"].strip() for r in rows)


def test_half_written_last_line_is_cut_and_answered_again(pipe, folder, tmp_path):
    qfile = write_questions(tmp_path / "q.jsonl", 6)
    full = run_inprocess(pipe, qfile, folder, tmp_path / "full.jsonl")
    out = tmp_path / "a.jsonl"
    lines = (tmp_path / "full.jsonl").read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:25])  # a crash in the middle of row 4
    assert len(read_rows(out)) == 3
    assert run_inprocess(pipe, qfile, folder, out) == full


def test_jsonl_writer_repairs_a_torn_row_and_csv_too(tmp_path):
    for name in ("r.jsonl", "r.csv"):
        path = tmp_path / name
        fields = ["image", "answer"]
        _, writer = open_rows(path, fields)
        with writer:
            writer.write({"image": "a.png", "answer": "two\nlines, quoted"})
            writer.write({"image": "b.png", "answer": "x"})
        data = path.read_bytes()
        path.write_bytes(data[:-3])  # tear the last row
        rows, writer = open_rows(path, fields)
        with writer:
            assert [r["image"] for r in rows] == ["a.png"] and rows[0]["answer"] == "two\nlines, quoted"
            writer.write({"image": "b.png", "answer": "x"})
        assert [r["image"] for r in read_rows(path, fields)] == ["a.png", "b.png"]


def test_model_vqa_loader_resumes_after_sigkill(pipe, folder, tmp_path):
    qfile = write_questions(tmp_path / "q.jsonl", 40)
    expected = run_inprocess(pipe, qfile, folder, tmp_path / "ref.jsonl", batch_size=8)
    out = tmp_path / "out" / "answers.jsonl"
    args = ["--question-file", str(qfile), "--image-folder", str(folder), "--answers-file", str(out),
            "--temperature", "0", "--max_new_tokens", "12"]
    proc = cli("llava.eval.model_vqa_loader", *args)
    kill_when_lines(proc, out, 3, 40)
    code, err = finish(cli("llava.eval.model_vqa_loader", *args, "--batch-size", "4"))
    assert code == 0, err
    assert "resuming" in err
    assert answers(out) == expected


def test_llava_batch_resumes_after_sigkill_and_reports_bad_images(pipe, folder, tmp_path):
    for i in range(3):  # more images so the run is still going when it is killed
        for name in EXAMPLES:
            shutil.copy(folder / name, folder / f"copy{i}_{name}")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image file name")
    out = tmp_path / "results.jsonl"
    args = ["--images", str(folder), "--prompt", "What is shown?", "--out", str(out), "--batch-size", "1",
            "--max-new-tokens", "12"]
    kill_when_lines(cli("llava.eval.batch", *args), out, 3, 25)
    code, err = finish(cli("llava.eval.batch", *args[:-3], "4", "--max-new-tokens", "12"))
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    images = sorted(str(p) for p in folder.iterdir() if p.suffix == ".png")
    assert sorted(r["image"] for r in rows) == images  # exactly one row per image
    bad = [r for r in rows if "error" in r]
    assert [r["image"] for r in bad] == [str(folder / "broken.png")] and bad[0]["answer"] == ""
    by_image = {r["image"]: r["answer"] for r in rows}
    for name in EXAMPLES[:2]:
        want = pipe.generate("What is shown?", images=str(folder / name), **GREEDY)
        assert by_image[str(folder / name)] == want


def test_bad_inputs_stop_with_one_line_and_exit_2(folder, tmp_path):
    qfile = write_questions(tmp_path / "q.jsonl", 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(qfile.read_text() + '{"question_id": 9, "text": \n')
    out = tmp_path / "a.jsonl"
    base = ["--image-folder", str(folder), "--answers-file", str(out), "--temperature", "0"]
    procs = {"malformed": cli("llava.eval.model_vqa", "--question-file", str(bad), *base)}
    missing = write_questions(tmp_path / "m.jsonl", 4)
    (folder / EXAMPLES[2]).unlink()
    out.write_text('{"question_id": "0", "prompt": "p", "text": "kept"}\n')
    procs["missing"] = cli("llava.eval.model_vqa_loader", "--question-file", str(missing), *base)
    other = tmp_path / "other.jsonl"
    other.write_text('{"question_id": "zzz", "text": "from another set"}\n')
    procs["other"] = cli("llava.eval.model_vqa_loader", "--question-file", str(qfile), *base[:2],
                         "--answers-file", str(other))
    procs["beams"] = cli("llava.eval.model_vqa_loader", "--question-file", str(qfile), "--num_beams", "3", *base)
    results = {name: finish(proc) for name, proc in procs.items()}
    for name, (code, err) in results.items():
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
    assert f"{bad}, line 5" in results["malformed"][1]
    assert "question '2'" in results["missing"][1] and EXAMPLES[2] in results["missing"][1]
    assert json.loads(out.read_text())["text"] == "kept"  # nothing lost
    assert "zzz" in results["other"][1] and str(other) in results["other"][1]
    assert other.read_text() == '{"question_id": "zzz", "text": "from another set"}\n'
    assert "num_beams" in results["beams"][1]


def test_errors_are_raised_before_the_model_loads(folder, tmp_path):
    def no_load():
        raise AssertionError("the model must not load")

    qfile = write_questions(tmp_path / "q.jsonl", 3)
    (folder / EXAMPLES[1]).unlink()
    with pytest.raises(ImageNotFound, match="question '1'"):
        run_answering(read_questions(qfile, folder), AnswerJob(answers_file=tmp_path / "a.jsonl"), no_load)
    (tmp_path / "q2.jsonl").write_text('{"question_id": 1, "text": "a"}\n{"question_id": 1, "text": "b"}\n')
    with pytest.raises(DataError, match="line 2"):
        read_questions(tmp_path / "q2.jsonl")


def test_chunks_are_the_originals_ceil_sized_slices():
    from llava.eval.answering import get_chunk

    items = list(range(10))
    assert [get_chunk(items, 3, k) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert get_chunk(items[:2], 4, 3) == []


def test_torchrun_ranks_write_shards_and_rank0_merges_in_question_order(pipe, folder, tmp_path, monkeypatch):
    qfile = write_questions(tmp_path / "q.jsonl", 7)
    out = tmp_path / "merged.jsonl"
    job = AnswerJob(answers_file=out, batch_size=3, sampling=GREEDY)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for rank in ("1", "0"):  # rank 1 finishes first; rank 0 waits for its mark, then merges
        monkeypatch.setenv("RANK", rank)
        run_answering(read_questions(qfile, folder), job, load=lambda: pipe)
    assert [json.loads(line)["question_id"] for line in out.read_text().splitlines()] == [str(i) for i in range(7)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == ["merged.jsonl"]


def test_science_and_mmbench_prompts_follow_the_original(tmp_path):
    import base64

    from llava.eval.model_vqa_mmbench import read_mmbench
    from llava.eval.model_vqa_science import LETTER_PROMPT, read_science

    (tmp_path / "s.json").write_text(json.dumps([{"id": "1", "image": "a.png", "conversations": [
        {"from": "human", "value": "Question: q?\nOptions: (A) x (B) y\n<image>"}]}]))
    item = read_science(str(tmp_path / "s.json"), "imgs", True)[0]
    assert item.head["prompt"] == f"<image>\nQuestion: q?\nOptions: (A) x (B) y\n{LETTER_PROMPT}"
    image = base64.b64encode((ROOT / "examples" / "circles.png").read_bytes()).decode()
    (tmp_path / "m.tsv").write_text("index\tquestion\thint\tA\tB\tC\tD\timage\n"
                                    f"5\tHow many?\tnan\t1\t2\t3\t\t{image}\n")
    items = read_mmbench(str(tmp_path / "m.tsv"), all_rounds=True, single_pred_prompt=True, lang="en")
    assert [i.key for i in items] == [(5, 0), (5, 1), (5, 2)]
    assert items[1].head["prompt"] == "How many?\nA. 2\nB. 3\nC. 1"
    assert items[1].tail == {"options": ["2", "3", "1"], "option_char": ["B", "C", "A"]}
    assert items[1].query.endswith("\nAnswer with the option's letter from the given choices directly.")
