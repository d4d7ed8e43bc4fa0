"""The synthetic world written as the real benchmarks (`llava.data.synth_benchmarks`).

Why these tests: the files are only worth having if the project's own answerers and scorers read
them unchanged. So every benchmark is answered from its ground truth through the answerer's own
question reader and scored with the flags `tiny.toml` gives its scorer: right answers must reach
the benchmark's maximum and wrong ones its minimum. One real answerer run of the shipped tiny
model, and a fake judge for the judged benchmarks, show that the pieces meet end to end.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from judge_helpers import running_judge

import llava
from llava.api import DEFAULT_MODEL
from llava.data.synth_benchmarks import (
    BENCHMARKS,
    META_FILE,
    SUITE_FILE,
    write_benchmarks,
)
from llava.data.synth_cli import add_synth_command
from llava.errors import InputError
from llava.eval.answering import AnswerJob, Item, read_questions, run_answering
from llava.eval.model_vqa_mmbench import read_mmbench
from llava.eval.model_vqa_science import read_science
from llava.eval.scoring import mme as mme_scorer
from llava.eval.scoring.mmbench import option_texts, read_tsv
from llava.eval.scoring.vqa_normalize import normalize_answer

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SEED, N = 0, 20
LETTERS = "ABCD"
SHORT = "\nAnswer the question using a single word or phrase."
NOT_JUDGED = ["pope", "scienceqa", "vqav2", "mme", "mmbench", "seed", "gqa"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    write_benchmarks(out, seed=SEED, n_per_benchmark=N)
    return out


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def suite_entry(bench: Path, name: str) -> dict:
    suite = tomllib.loads((bench / SUITE_FILE).read_text())
    return next(b for b in suite["benchmarks"] if b["name"] == name)


# -- the suite's view of a benchmark: its answerer's items, its scorer with the suite's flags --------


def items_of(bench: Path, name: str) -> list[Item]:
    """The benchmark's questions as its answerer reads them, with the suite's answer_args."""
    entry = suite_entry(bench, name)
    question_file = bench / entry["question_file"]
    image_folder = str(bench / entry.get("image_folder", ""))
    args = entry.get("answer_args", {})
    if entry["answerer"] == "science":
        return read_science(str(question_file), image_folder, args.get("single_pred_prompt", False))
    if entry["answerer"] == "mmbench":
        return read_mmbench(str(question_file), args.get("all_rounds", False), args.get("single_pred_prompt", False),
                            "en")
    return read_questions(question_file, image_folder)


def write_answers(path: Path, items: list[Item], texts: list[str]) -> Path:
    """Rows in the shape `llava.eval.answering` writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**item.head, "text": text, **item.tail, "answer_id": f"id{k}", "model_id": "test", "metadata": {}}
            for k, (item, text) in enumerate(zip(items, texts))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def score(bench: Path, name: str, answers: Path, work: Path, judge_url: str = "") -> dict:
    """Run the benchmark's scorer with the flags `tiny.toml` gives it, placeholders filled as the runner does."""
    entry = suite_entry(bench, name)
    module = importlib.import_module(f"llava.eval.scoring.{entry['scorer']}")
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    known = {s for action in parser._actions for s in action.option_strings}
    (work / name).mkdir(parents=True, exist_ok=True)  # the runner makes {out}
    places = {"suite": str(bench), "answers": str(answers), "answers_dir": str(answers.parent), "experiment": name,
              "out": str(work / name), "judge_url": judge_url, "judge_model": "fake-judge"}
    argv: list[str] = []
    for key, value in entry["score"].items():
        flag = next(f for f in (f"--{key}", f"--{key.replace('_', '-')}") if f in known)
        values = value if isinstance(value, list) else [value]
        argv += [flag, *(v.format_map(places) for v in values)]
    return module.score_from_args(parser.parse_args(argv))


# -- the ground truth, read from each benchmark's own files ---------------------------------------------


def truth(bench: Path, name: str, items: list[Item]) -> tuple[list[str], list[str]]:
    """(right, wrong) answer texts for the items, from the benchmark's ground-truth files."""
    b = bench / name
    if name == "pope":
        labels = {}
        for path in (b / "annotations").iterdir():
            labels.update({r["question_id"]: r["label"] for r in map(json.loads, path.read_text().splitlines())})
        right = [labels[i.key[0]].capitalize() for i in items]
        return right, ["No" if r == "Yes" else "Yes" for r in right]
    if name == "scienceqa":
        problems = json.loads((b / "problems.json").read_text())
        pairs = [(problems[i.key[0]]["answer"], len(problems[i.key[0]]["choices"])) for i in items]
        return [LETTERS[a] for a, _ in pairs], [LETTERS[(a + 1) % k] for a, k in pairs]
    if name == "vqav2":
        gt = {a["question_id"]: a["multiple_choice_answer"] for a in
              json.loads((b / "v2_mscoco_test-dev2015_annotations.json").read_text())["annotations"]}
        return [gt[i.key[0]] for i in items], ["elephant"] * len(items)
    if name == "gqa":
        gt = json.loads((b / "testdev_balanced_questions.json").read_text())
        return [gt[i.key[0]]["answer"].capitalize() + "." for i in items], ["elephant"] * len(items)
    if name == "seed":
        gt = {q["question_id"]: q["answer"] for q in json.loads((b / "SEED-Bench.json").read_text())["questions"]}
        right = [gt[i.key[0]] for i in items]
        return right, [LETTERS[(LETTERS.index(r) + 1) % 4] for r in right]
    if name == "mme":
        gt = mme_scorer.read_ground_truth(b / "MME_Benchmark_release_version")
        right = [gt[(i.key[0].split("/")[0], i.key[0].split("/")[-1].split(".")[0] + ".txt",
                     i.head["prompt"].replace(SHORT, ""))] for i in items]
        return right, ["No" if r == "Yes" else "Yes" for r in right]
    assert name == "mmbench"
    rows = {r["index"]: r for r in read_tsv(b / "mmbench_dev_synth.tsv")[1]}
    right = []
    for i in items:  # the right option's letter in this round's rotation of the options
        row = rows[str(i.key[0])]
        right.append(LETTERS[i.tail["options"].index(option_texts(row)[LETTERS.index(row["answer"])])])
    # wrong in round 0 only: circular evaluation must still fail the question
    wrong = [LETTERS[(LETTERS.index(r) + 1) % len(i.tail["options"])] if i.key[1] == 0 else r
             for r, i in zip(right, items)]
    return right, wrong


def headline(name: str, metrics: dict) -> float:
    """The number each benchmark reports, as a percentage (MME: Perception + Cognition, out of 2800)."""
    if name == "pope":
        return 100 * min(min(m["accuracy"], m["f1"]) for m in metrics["categories"].values())
    if name == "scienceqa":
        assert metrics["img_total"] and metrics["img_total"] < metrics["total"]  # both kinds of problem
        return min(metrics["accuracy"], metrics["img_accuracy"])
    if name == "mme":
        assert len(metrics["Perception"]["tasks"]) == 10 and len(metrics["Cognition"]["tasks"]) == 4
        return (metrics["Perception"]["total"] + metrics["Cognition"]["total"]) / 28
    if name == "mmbench":
        return metrics["circular"]["accuracy"]
    if name == "seed":
        return min(metrics["total"], metrics["image"])
    return metrics["accuracy"]


# -- tests ------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(bench, tmp_path):
    write_benchmarks(tmp_path / "again", seed=SEED, n_per_benchmark=N)
    assert tree(tmp_path / "again") == tree(bench)
    write_benchmarks(tmp_path / "other", seed=SEED + 1, n_per_benchmark=N)
    other = tree(tmp_path / "other")
    assert other.keys() == tree(bench).keys()
    assert other["pope/llava_pope_test.jsonl"] != tree(bench)["pope/llava_pope_test.jsonl"]


def test_suite_file_names_every_benchmark_and_existing_files(bench):
    suite = tomllib.loads((bench / SUITE_FILE).read_text())
    assert suite["name"] == "tiny" and suite["defaults"]["temperature"] == 0
    assert [b["name"] for b in suite["benchmarks"]] == list(BENCHMARKS)
    meta = json.loads((bench / META_FILE).read_text())
    for b in suite["benchmarks"]:
        assert (bench / b["question_file"]).is_file(), b["name"]
        assert b["answerer"] == "mmbench" or (bench / b["image_folder"]).is_dir(), b["name"]
        for value in b["score"].values():
            for v in value if isinstance(value, list) else [value]:
                if v.startswith("{suite}/"):
                    assert (bench / v.removeprefix("{suite}/")).exists(), (b["name"], v)
        assert len(items_of(bench, b["name"])) >= meta["questions"][b["name"]]  # MMBench: x rounds
    # LLaVA's suffixes: short answer for the loader benchmarks but SEED's letters, none for the judged ones
    assert all(i.query.endswith(SHORT) for n in ("pope", "vqav2", "gqa", "mme") for i in items_of(bench, n))
    assert all(i.query.endswith("directly.") for n in ("seed", "scienceqa", "mmbench") for i in items_of(bench, n))
    assert not any("Answer" in i.query for n in ("llava_bench", "mm_vet") for i in items_of(bench, n))


def test_the_suite_runner_accepts_tiny_toml(bench, tmp_path):
    """The runner's own check of every answerer's and scorer's flags (no model is loaded)."""
    runner = pytest.importorskip("llava.eval.suite")
    plans = runner.check(runner.read_suite(bench / SUITE_FILE), runner.RunOptions(model=None, out=tmp_path / "run"))
    assert [plan[0].name for plan in plans] == list(BENCHMARKS)


@pytest.mark.parametrize("name", NOT_JUDGED)
def test_right_answers_score_the_maximum_and_wrong_ones_the_minimum(bench, tmp_path, name):
    items = items_of(bench, name)
    right, wrong = truth(bench, name, items)
    best = score(bench, name, write_answers(tmp_path / "right" / f"{name}.jsonl", items, right), tmp_path)
    worst = score(bench, name, write_answers(tmp_path / "wrong" / f"{name}.jsonl", items, wrong), tmp_path)
    assert headline(name, best) == pytest.approx(100.0)
    assert headline(name, worst) == pytest.approx(0.0)
    if name == "mme":  # 2 x 100 per subtask: Perception 2000, Cognition 800
        assert (best["Perception"]["total"], best["Cognition"]["total"]) == (2000, 800)


def test_vqav2_mixes_answer_spellings_so_only_canonical_ones_get_full_credit(bench):
    annotations = json.loads((bench / "vqav2" / "v2_mscoco_test-dev2015_annotations.json").read_text())["annotations"]
    for a in annotations:
        answers = [x["answer"] for x in a["answers"]]
        canonical = normalize_answer(a["multiple_choice_answer"])
        assert len(answers) == 10 and sum(normalize_answer(x) == canonical for x in answers) >= 4
        assert len({x for x in answers if normalize_answer(x) == canonical}) >= 2  # e.g. "2" and "two"
        assert any(normalize_answer(x) != canonical for x in answers)  # e.g. "a red circle" for "red"


def test_judged_benchmarks_are_read_by_their_scorers(bench, tmp_path):
    with running_judge() as judge:  # rates every answer as good as the reference
        judge.script.update({"[Assistant 1]": [(200, "8 8\nBoth answers are right.")],  # LLaVA-Bench
                             "": [(200, "1.0")]})  # MM-Vet
        url = judge.url
        items = items_of(bench, "llava_bench")
        refs = {r["question_id"]: r["text"] for r in map(json.loads, (bench / "llava_bench" / "answers_gpt4.jsonl")
                                                        .read_text().splitlines())}
        answers = write_answers(tmp_path / "a" / "llava_bench.jsonl", items, [refs[i.key[0]] for i in items])
        m = score(bench, "llava_bench", answers, tmp_path, url)
        assert m["reviewed"] == len(items) and m["categories"]["all"]["relative"] == 100.0
        assert {"llava_bench_conv", "llava_bench_detail", "llava_bench_complex"} <= set(m["categories"])
        items = items_of(bench, "mm_vet")
        gt = json.loads((bench / "mm_vet" / "mm-vet.json").read_text())
        answers = write_answers(tmp_path / "a" / "mm_vet.jsonl", items, [gt[f"v1_{i.key[0]}"]["answer"] for i in items])
        m = score(bench, "mm_vet", answers, tmp_path, url)
        assert m["graded"] == len(items) and m["total"] == 100.0
        assert set(m["capabilities"]) == {"rec", "ocr", "spat", "math", "gen"}


def test_shipped_model_through_the_real_answerer_and_scorer(bench, tmp_path):
    """`model_vqa_loader` as a command, on POPE, then `eval_pope`: the formats meet end to end."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="2")
    answers = tmp_path / "pope.jsonl"
    answer = subprocess.run(
        [sys.executable, "-m", "llava.eval.model_vqa_loader", "--model-path", str(DEFAULT_MODEL),
         "--question-file", str(bench / "pope" / "llava_pope_test.jsonl"),
         "--image-folder", str(bench / "pope" / "images"),
         "--answers-file", str(answers), "--temperature", "0", "--max_new_tokens", "8", "--batch-size", "16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert answer.returncode == 0, answer.stderr
    out = subprocess.run(
        [sys.executable, "-m", "llava.eval.eval_pope", "--annotation-dir", str(bench / "pope" / "annotations"),
         "--question-file", str(bench / "pope" / "llava_pope_test.jsonl"), "--result-file", str(answers)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert [line.split(",")[0] for line in out.stdout.splitlines() if line.startswith("Category:")] == \
        ["Category: adversarial", "Category: popular", "Category: random"]
    m = score(bench, "pope", answers, tmp_path)
    assert m["average_f1"] > 0.7, out.stdout  # it was trained on exactly these existence questions


def test_shipped_model_answers_every_format(tmp_path):
    """Each answerer's reader and the shipped model (loaded once) on every scored benchmark (a smaller
    set, for time), then its scorer: every format yields a number, and the ones the model was trained
    for are well above chance."""
    bench = tmp_path / "small"
    write_benchmarks(bench, seed=SEED, n_per_benchmark=10, benchmarks=NOT_JUDGED)
    pipe = llava.load(device="cpu")
    results = {}
    for name in NOT_JUDGED:
        job = AnswerJob(answers_file=tmp_path / "answers" / f"{name}.jsonl", batch_size=16,
                        sampling={"temperature": 0.0, "max_new_tokens": 8}, model_id="tiny-llava",
                        key_fields=("question_id", "round_id") if name == "mmbench" else ("question_id",))
        run_answering(items_of(bench, name), job, load=lambda: pipe)
        results[name] = headline(name, score(bench, name, job.answers_file, tmp_path))
    assert all(0 <= v <= 100 for v in results.values()), results
    # Trained on these very questions: well above chance (yes/no 50%, open answers far lower). MME's
    # " Please answer yes or no." is a phrase the tiny model never saw, and it breaks it (~2%).
    assert results["vqav2"] > 60 and results["gqa"] > 60, results


def test_cli_writes_a_subset_and_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_synth_command(parser.add_subparsers().add_parser("data").add_subparsers())
    args = parser.parse_args(["data", "synth-bench", "--out", str(tmp_path / "b"), "--n", "6", "--only", "pope,gqa"])
    assert args.func(args) == 0
    assert "tiny.toml" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["gqa", "pope", META_FILE, SUITE_FILE]
    suite = tomllib.loads((tmp_path / "b" / SUITE_FILE).read_text())
    assert [b["name"] for b in suite["benchmarks"]] == ["pope", "gqa"]
    assert args.func(args) == 0  # a rerun replaces its own folders
    (tmp_path / "real" / "pope").mkdir(parents=True)
    (tmp_path / "real" / "pope" / "llava_pope_test.jsonl").write_text("{}\n")
    with pytest.raises(InputError, match="not written by"):
        write_benchmarks(tmp_path / "real", benchmarks=["pope"])
    with pytest.raises(InputError, match="unknown benchmark"):
        write_benchmarks(tmp_path / "x", benchmarks=["nope"])
