"""`llava eval run --suite`: one command answers and scores a suite, writes a table, JSON and chart,
and a rerun skips what is done.

Why these tests: the suite runner is glue between the original's answering commands and the
scorers, so the tests check the glue (placeholders, flag spellings, resume, one failing benchmark
not sinking the others) and that its numbers are the scorers' own numbers for the same files.
A bad suite file must fail in one line before any model loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ["circles.png", "color.png", "shape.png", "word_cat.png", "shapes.png", "two_circles.png"]
SHORT = "\nAnswer the question using a single word or phrase."


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "llava.cli", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def make_suite(root: Path, pope_annotations: str = "{suite}/pope/annotations") -> Path:
    """A POPE benchmark (two categories, labels by position) and a ScienceQA one, on the example images."""
    (root / "pope" / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for name in EXAMPLES:
        shutil.copy(ROOT / "examples" / name, root / "images" / name)
    questions, labels = [], {"random": [], "popular": []}
    for i, (thing, label) in enumerate([("circle", "yes"), ("cat", "no"), ("square", "yes"), ("dog", "no"),
                                        ("word", "yes"), ("car", "no")]):
        category = "random" if i % 2 == 0 else "popular"
        questions.append({"question_id": i, "image": EXAMPLES[i], "text": f"Is there a {thing} in the image?{SHORT}",
                          "category": category})
        labels[category].append({"question_id": i, "label": label})
    (root / "pope" / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    for category, rows in labels.items():
        (root / "pope" / "annotations" / f"coco_pope_{category}.json").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    sqa = root / "sqa"
    sqa.mkdir()
    problems = {str(i): {"question": f"What is shown {i}?", "choices": ["a circle", "a word", "a cat"], "answer": i % 3,
                         "hint": "", "image": "image.png", "split": "test"} for i in range(4)}
    (sqa / "problems.json").write_text(json.dumps(problems))
    (sqa / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    (sqa / "q.json").write_text(json.dumps([
        {"id": pid, "image": EXAMPLES[int(pid)], "conversations": [
            {"from": "human", "value": f"<image>\nContext: N/A\nQuestion: {p['question']}\n"
                                       "Options: (A) a circle (B) a word (C) a cat"}]} for pid, p in problems.items()]))
    suite = root / "mini.toml"
    suite.write_text(f"""
name = "mini"
[defaults]
temperature = 0
max_new_tokens = 6
batch_size = 4

[[benchmarks]]
name = "pope"
question_file = "pope/q.jsonl"
image_folder = "images"
[benchmarks.score]
annotation-dir = "{pope_annotations}"
question_file = "{{suite}}/pope/q.jsonl"
result-file = "{{answers}}"

[[benchmarks]]
name = "sqa"
scorer = "science_qa"
answerer = "science"
question_file = "sqa/q.json"
image_folder = "images"
answer_args = {{ single-pred-prompt = true }}
max_new_tokens = 4
[benchmarks.score]
base-dir = "{{suite}}/sqa"
result-file = "{{answers}}"
output-result = "{{out}}/sqa_result.json"
""")
    return suite


def test_a_suite_is_answered_scored_and_resumed(tmp_path: Path) -> None:
    suite = make_suite(tmp_path / "suite")
    out = tmp_path / "out"
    first = run_cli("eval", "run", "--suite", str(suite), "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    pope, sqa = results["benchmarks"]["pope"], results["benchmarks"]["sqa"]
    assert (pope["answers"], sqa["answers"]) == (6, 4) and pope["answered_now"] == 6
    assert (out / "work" / "sqa" / "sqa_result.json").is_file()  # the {out} placeholder reached the scorer
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The headline is the scorers' own number on the same answers file.
    pope_json = run_cli("eval", "score", "pope", "--annotation-dir", str(tmp_path / "suite/pope/annotations"),
                        "--question-file", str(tmp_path / "suite/pope/q.jsonl"),
                        "--result-file", str(out / "answers/pope.jsonl"), "--json")
    f1 = [m["f1"] for m in json.loads(pope_json.stdout)["categories"].values()]
    assert pope["value"] == pytest.approx(100 * sum(f1) / 2) and pope["metric"].startswith("F1")
    sqa_json = json.loads(run_cli("eval", "score", "science_qa", "--base-dir", str(tmp_path / "suite/sqa"),
                                  "--result-file", str(out / "answers/sqa.jsonl"), "--json").stdout)
    assert sqa["value"] == sqa_json["img_accuracy"]
    table = (out / "results.md").read_text()
    assert f"| pope | F1, mean of categories | {pope['value']:.2f} | 6 |" in table
    assert table in first.stdout

    # The science answerer got its own flag (the letter prompt) and its own token budget.
    row = json.loads((out / "answers/sqa.jsonl").read_text().splitlines()[0])
    assert row["prompt"].endswith("Answer with the option's letter from the given choices directly.")

    # A rerun answers nothing (the model is not even loaded) and scores the same.
    again = run_cli("eval", "run", "--suite", str(suite), "--out", str(out), "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    rerun = json.loads(again.stdout)["benchmarks"]
    assert rerun["pope"]["answered_now"] == rerun["sqa"]["answered_now"] == 0
    assert (rerun["pope"]["value"], rerun["sqa"]["value"]) == (pope["value"], sqa["value"])
    assert "resumed" in (out / "results.md").read_text()


def test_a_failing_scorer_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    suite = make_suite(tmp_path / "suite", pope_annotations="{suite}/no-such-folder")
    out = tmp_path / "out"
    result = run_cli("eval", "run", "--suite", str(suite), "--out", str(out), "--only", "pope", "sqa")
    assert result.returncode == 1
    results = json.loads((out / "results.json").read_text())["benchmarks"]
    assert results["pope"]["status"] == "error" and "no-such-folder" in results["pope"]["reason"]
    assert results["sqa"]["status"] == "scored"
    assert "| pope | error:" in (out / "results.md").read_text()


@pytest.mark.parametrize("edit, message", [
    (('scorer = "science_qa"', 'scorer = "sciencqa"'), "unknown benchmark 'sciencqa'"),
    (('result-file = "{answers}"\noutput', 'result-fil = "{answers}"\noutput'), "unknown flag 'result-fil'"),
    (('"{out}/sqa_result.json"', '"{outt}/x.json"'), "unknown placeholder {outt}"),
    (('question_file = "sqa/q.json"', 'question_file = "sqa/missing.json"'), "missing.json not found"),
    (('answerer = "science"', 'answerer = "sciense"'), "unknown answerer 'sciense'"),
    (('answer_args = { single-pred-prompt = true }', 'answer_args = { single-pred = true }'), "unknown flag 'single-pred'"),
    (('base-dir = "{suite}/sqa"\n', ''), "required: --base-dir"),
    (('max_new_tokens = 4', 'max_new_token = 4'), "unknown key(s) max_new_token"),
    (('name = "sqa"', 'name = "pope"'), "the name is used twice"),
    (('[defaults]', '[defaults'), "not valid TOML"),
])
def test_a_bad_suite_fails_in_one_line_before_the_model_loads(tmp_path: Path, edit: tuple[str, str],
                                                               message: str) -> None:
    suite = make_suite(tmp_path / "suite")
    text = suite.read_text()
    assert edit[0] in text
    suite.write_text(text.replace(edit[0], edit[1], 1))
    result = run_cli("eval", "run", "--suite", str(suite), "--out", str(tmp_path / "out"), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out" / "answers").exists()  # nothing was answered


def test_only_names_benchmarks_of_the_suite(tmp_path: Path) -> None:
    suite = make_suite(tmp_path / "suite")
    result = run_cli("eval", "run", "--suite", str(suite), "--only", "vqav2", timeout=60)
    assert result.returncode == 2 and "--only vqav2: not in suite 'mini'" in result.stderr


def test_the_tiny_suite_runs_end_to_end_on_the_shipped_model(tmp_path: Path) -> None:
    """`llava data synth-bench` writes every benchmark's native files and `tiny.toml`; one `llava eval
    run` answers and scores all nine with the shipped model, the judged two through a loopback judge."""
    from judge_helpers import running_judge

    data, out = tmp_path / "bench", tmp_path / "out"
    made = run_cli("data", "synth-bench", "--out", str(data), "--n", "12", timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    with running_judge() as judge:
        judge.script.update({"[Assistant 1]": [(200, "8 6\nAssistant 2 is shorter.")],  # LLaVA-Bench reviews
                             "": [(200, "0.5")]})  # MM-Vet grades
        result = run_cli("eval", "run", "--suite", str(data / "tiny.toml"), "--out", str(out),
                         "--judge-url", judge.url, "--judge-model", "fake-judge")
        assert result.returncode == 0, result.stderr[-3000:]
    benchmarks = json.loads((out / "results.json").read_text())["benchmarks"]
    expected = {"pope", "scienceqa", "vqav2", "mme", "mmbench", "seed", "gqa", "llava_bench", "mm_vet"}
    assert set(benchmarks) == expected
    for name, r in benchmarks.items():
        assert r["status"] == "scored" and r["value"] is not None and r["answers"] > 0, (name, r)
        assert 0 <= r["value"] <= (r["maximum"] if name != "llava_bench" else 1000), (name, r)
    assert benchmarks["llava_bench"]["value"] == pytest.approx(75.0)  # every review "8 6": 6 / 8
    assert benchmarks["mm_vet"]["value"] == pytest.approx(50.0)      # every grade 0.5
    assert benchmarks["mme"]["maximum"] == 2000
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in expected)
