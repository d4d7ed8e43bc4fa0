"""Benchmark scorers, part A (POPE, ScienceQA, MME, SEED, MMBench), on hand-made files.

Every expected number is worked out by hand from the upstream rules (see each comment), never
copied from the scorer's own output.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.errors import DataError, InputError
from llava.eval.scoring import files, mmbench, mme, pope, science_qa, seed

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["files", "pope", "science_qa", "mme", "seed", "mmbench"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], check=False, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def args_for(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def test_scorers_do_not_import_torch():
    code = ("import sys; import " + ", ".join(f"llava.eval.scoring.{m}" for m in MODULES)
            + "; print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False False", out.stderr


def test_files_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"x": 1}\n\n{"x": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl, line 3"):
        files.read_jsonl(bad)
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n[1]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        files.read_jsonl(tmp_path / "b.jsonl")
    with pytest.raises(InputError, match="no such file"):
        files.read_json(tmp_path / "missing.json")


# ---------------------------------------------------------------- POPE

@pytest.mark.parametrize("text, parsed", [
    ("Yes, there is a dog.", "yes"),      # commas dropped, no No/not/no word
    ("No, there is not.", "no"),          # "No" word
    ("NO", "yes"),                        # case-sensitive: NO is not No
    ("no", "no"),
    ("There is no dog in the image.", "no"),
    ("Yes. But no cat.", "yes"),          # only the first sentence counts
    ("It is not.", "no"),
    ("No.", "no"),
    ("Nope", "yes"),                      # whole words only
    ("no!", "yes"),                       # "no!" is not the word "no"
    ("", "yes"),                          # empty -> yes
])
def test_pope_parse(text, parsed):
    assert pope.parse_pope_answer(text) == parsed


def test_pope_score_by_hand():
    # preds yes, yes, no, yes(NO); labels yes, no, no, yes -> TP=2 FP=1 TN=1 FN=0
    m = pope.score_pope(["Yes, there is a dog.", "Yes", "No, there is not.", "NO"], ["yes", "no", "no", "yes"])
    assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (2, 1, 1, 0)
    assert m["precision"] == pytest.approx(2 / 3)   # 2/(2+1)
    assert m["recall"] == 1.0                      # 2/(2+0)
    assert m["f1"] == pytest.approx(0.8)           # 2*(2/3)*1/(2/3+1)
    assert m["accuracy"] == 0.75 and m["yes_ratio"] == 0.75  # 3/4 right, 3/4 said yes
    with pytest.raises(DataError, match="by position"):
        pope.score_pope(["yes"], ["yes", "no"])


@pytest.fixture
def pope_files(tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    write_jsonl(ann / "coco_pope_adversarial.json", [{"label": "yes"}, {"label": "no"}])
    write_jsonl(ann / "coco_pope_random.json", [{"label": "yes"}, {"label": "no"}])
    (ann / "README.txt").write_text("not a label file")
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"question_id": 1, "category": "adversarial"}, {"question_id": 3, "category": "random"},
        {"question_id": 2, "category": "adversarial"}, {"question_id": 4, "category": "random"}])
    answers = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": 1, "text": "Yes"}, {"question_id": 3, "text": "no"},
        {"question_id": 2, "text": "There is no dog."}, {"question_id": 4, "text": "Yes, it is."}])
    return ann, questions, answers


def test_pope_front_door(pope_files, tmp_path):
    ann, questions, answers = pope_files
    out = run("llava.eval.eval_pope", "--annotation-dir", ann, "--question-file", questions, "--result-file", answers)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # adversarial: answers 1 (Yes vs yes) and 2 (no vs no) -> TP=1 FP=0 TN=1 FN=0, yes ratio 1/2
    assert lines[:3] == ["Category: adversarial, # samples: 2", "TP\tFP\tTN\tFN\t", "1\t0\t1\t0"]
    assert "Accuracy: 1.0" in lines and "Yes ratio: 0.5" in lines
    assert "1.000, 1.000, 1.000, 1.000, 0.500" in lines
    # random: 3 (no vs yes) FN, 4 (yes vs no) FP -> TP=0: P=R=F1=0 (0 by choice), acc 0, yes ratio 1/2
    assert "Category: random, # samples: 2" in lines and "0\t1\t0\t1" in lines
    assert "0.000, 0.000, 0.000, 0.000, 0.500" in lines
    assert lines.count("====================================") == 2
    metrics = pope.score_from_args(args_for(pope, ["--annotation-dir", ann, "--question-file", questions,
                                                   "--result-file", answers]))
    assert metrics["average_f1"] == 0.5  # (1 + 0) / 2


def test_pope_bad_input_one_line_exit_2(pope_files, tmp_path):
    ann, questions, _ = pope_files
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "Yes"}\n{"question_id": 3, "text": \n', encoding="utf-8")
    out = run("llava.eval.eval_pope", "--annotation-dir", ann, "--question-file", questions, "--result-file", bad)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "bad.jsonl, line 2" in out.stderr
    write_jsonl(bad, [{"question_id": 99, "text": "Yes"}])
    with pytest.raises(DataError, match="line 1: question_id 99"):
        pope.score_pope_files(ann, questions, bad)


# ---------------------------------------------------------------- ScienceQA

@pytest.mark.parametrize("text, letter", [
    ("A", "A"),                    # rule 1: the whole text is a letter
    ("B. dog", "B"),               # rule 2: "X. " prefix
    ("The answer is C.", "C"),     # rule 3
    ("The answer is C", "FAILED"),  # the regex's "." needs one more char
    ("The answer is Cat", "C"),    # ... any char
    ("The answer is A. The answer is B.", "FAILED"),  # two matches
    ("the answer is B.", "FAILED"),  # the regex is case-sensitive
    ("a", "FAILED"),               # case-sensitive
    ("A ", "FAILED"),              # no stripping
    ("dog", "FAILED"),             # option text is not a letter
    ("", "FAILED"),
])
def test_science_qa_letters(text, letter):
    assert science_qa.extract_letter(text) == letter


def test_science_qa_index_range():
    assert science_qa.pred_index("E", 3) == -1     # E is out of range for 3 choices
    assert science_qa.pred_index("C", 3) == 2
    assert science_qa.pred_index("FAILED", 3) == -1


@pytest.fixture
def sqa_files(tmp_path):
    base = tmp_path / "sqa"
    base.mkdir()
    problems = {
        "p1": {"choices": ["x", "y", "z"], "answer": 0},
        "p2": {"choices": ["x", "y"], "answer": 1},
        "p3": {"choices": ["x", "y", "z"], "answer": 2},
        "p4": {"choices": ["w", "x", "y", "z"], "answer": 3},
        "p5": {"choices": ["cat", "dog"], "answer": 0},
        "p6": {"choices": ["x", "y"], "answer": 0},
    }
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["p1", "p2", "p3", "p4", "p5"], "val": ["p6"]}))
    answers = write_jsonl(tmp_path / "a.jsonl", [
        {"question_id": "p1", "prompt": "<image>\nQ", "text": "A"},                 # right, image
        {"question_id": "p2", "prompt": "Q", "text": "The answer is B."},          # right, no image
        {"question_id": "p3", "prompt": "<image>\nQ", "text": "E"},                # E out of range: wrong
        {"question_id": "p5", "prompt": "<image>\nQ", "text": "cat"},              # option text: wrong
        {"question_id": "p6", "prompt": "<image>\nQ", "text": "A"},                # not in the test split
    ])  # p4 missing: FAILED, wrong, not multimodal
    return base, answers


def test_science_qa_front_door(sqa_files, tmp_path):
    base, answers = sqa_files
    out_file, out_result = tmp_path / "out.json", tmp_path / "res.json"
    out = run("llava.eval.eval_science_qa", "--base-dir", base, "--result-file", answers,
              "--output-file", out_file, "--output-result", out_result)
    assert out.returncode == 0, out.stderr
    # 5 problems, right: p1 p2 -> 40.00%; with <image>: p1 right, p3 p5 wrong -> 1/3 = 33.33%
    assert out.stdout.strip() == "Total: 5, Correct: 2, Accuracy: 40.00%, IMG-Accuracy: 33.33%"
    res = json.loads(out_result.read_text())
    assert res["acc"] == 40.0 and res["correct"] == 2 and res["count"] == 5
    assert res["results"] == {"p1": 0, "p2": 1, "p3": -1, "p4": -1, "p5": -1}
    assert res["outputs"]["p4"] == "FAILED"
    analysis = json.loads(out_file.read_text())
    assert [a["question_id"] for a in analysis["correct"]] == ["p1", "p2"]
    assert analysis["incorrect"][1] == {"question_id": "p4", "parsed_ans": "FAILED", "ground_truth": "D",
                                        "question": "Unknown", "pred": "FAILED", "is_multimodal": False}


def test_science_qa_bad_split(sqa_files):
    base, answers = sqa_files
    out = run("llava.eval.eval_science_qa", "--base-dir", base, "--result-file", answers, "--split", "minival")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "--split 'minival'" in out.stderr


# ---------------------------------------------------------------- MME

@pytest.mark.parametrize("pred, parsed", [
    ("yes", "yes"), ("no", "no"), ("yes, there is\n", "yes"), ("no\n", "no"),
    ("not sure", "no"),                 # "not " contains "no"
    ("nope", "no"),
    ("the answer is yes", "other"),     # only the first 4 chars are looked at
    ("", "other"),
])
def test_mme_parse(pred, parsed):
    assert mme.parse_mme_answer(pred) == parsed


def test_mme_subtask_by_hand(tmp_path):
    path = tmp_path / "existence.txt"
    path.write_text("a.jpg\tQ1\tYes\tYes\n"                  # right
                    "a.jpg\tQ2\tNo\tNo, there is not.\n"     # "no, " -> no: right -> image a both right
                    "b.jpg\tQ1\tYes\tThe answer is yes\n"    # other: wrong
                    "b.jpg\tQ2\tNo\tno\n")                   # right
    m = mme.score_subtask(path)
    # acc 3/4, acc+ 1/2 -> score 75 + 50
    assert (m["acc"], m["acc_plus"], m["score"], m["other_num"]) == (0.75, 0.5, 125.0, 1)
    path.write_text("a.jpg\tQ1\tYes\tYes\n")
    with pytest.raises(DataError, match="two questions per image"):
        mme.score_subtask(path)


def make_mme_release(root: Path, existence_second: str = "yes") -> tuple[Path, list[dict]]:
    """A release folder with one image (two questions) per subtask, and answers for it."""
    data = root / "MME_Benchmark_release_version"
    answers = []
    for task in mme.EVAL_TYPES["Perception"] + mme.EVAL_TYPES["Cognition"]:
        qa = data / task / "questions_answers_YN" if task == "artwork" else data / task
        qa.mkdir(parents=True)
        if task == "artwork":
            (data / task / "images").mkdir()
        q2 = "Q2?  Please answer yes or no." if task == "artwork" else "Q2? Please answer yes or no."
        (qa / "img.txt").write_text(f"Q1? Please answer yes or no.\tYes\n{q2}\tNo\n")
        second = existence_second if task == "existence" else "No"
        answers += [{"question_id": f"{task}/img.png", "prompt": "Q1?\nAnswer the question using a single word or "
                     "phrase.", "text": "Yes"},
                    {"question_id": f"{task}/img.png", "prompt": "Q2?", "text": second}]
    return data, answers


def test_mme_convert_and_front_door(tmp_path):
    data, answers = make_mme_release(tmp_path)
    (tmp_path / "answers").mkdir()
    write_jsonl(tmp_path / "answers" / "exp.jsonl", answers)
    out = run("llava.eval.convert_mme", "--experiment", "exp", "--data-path", data,
              "--answers-dir", tmp_path / "answers", "--output-dir", tmp_path / "eval_tool" / "answers")
    assert out.returncode == 0, out.stderr
    converted = tmp_path / "eval_tool" / "answers" / "exp"
    # the short-answer suffix is replaced by " Please answer yes or no."; artwork's GT has two spaces
    assert (converted / "existence.txt").read_text() == ("img.txt\tQ1? Please answer yes or no.\tYes\tYes\n"
                                                         "img.txt\tQ2? Please answer yes or no.\tNo\tyes\n")
    assert "Q2?  Please answer yes or no.\tNo\tNo" in (converted / "artwork.txt").read_text()
    # existence: Q2 wrong -> acc 1/2, acc+ 0 -> 50; the other 9 perception subtasks 200 each
    lines = out.stdout.splitlines()
    assert lines[0] == "=========== Perception ==========="
    assert "total score: 1850.0 " in lines and "\t existence  score: 50.0" in lines
    assert "\t OCR  score: 200.0" in lines
    assert "=========== Cognition ===========" in lines and "total score: 800.0 " in lines


def test_mme_bad_answers(tmp_path):
    data, answers = make_mme_release(tmp_path)
    answers[3]["prompt"] = "Some other question?"
    (tmp_path / "answers").mkdir()
    write_jsonl(tmp_path / "answers" / "exp.jsonl", answers)
    out = run("llava.eval.convert_mme", "--experiment", "exp", "--data-path", data,
              "--answers-dir", tmp_path / "answers", "--output-dir", tmp_path / "out")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "exp.jsonl, line 4: no ground truth" in out.stderr
    with pytest.raises(InputError, match="existence.txt: no such file"):
        mme.score_results_dir(tmp_path / "nowhere")


# ---------------------------------------------------------------- SEED

SEED_ANNOTATION = {
    "question_type": {"Scene Understanding": 1, "Instance Identity": 2},
    "questions": [
        {"question_id": "1", "question_type_id": 1, "data_type": "image", "answer": "A"},
        {"question_id": "2", "question_type_id": 1, "data_type": "image", "answer": "B"},
        {"question_id": "3", "question_type_id": 2, "data_type": "image", "answer": "C"},
        {"question_id": "v4", "question_type_id": 2, "data_type": "video", "answer": "D"},
        {"question_id": "5", "question_type_id": 2, "data_type": "image", "answer": "A"},
    ],
}
SEED_ANSWERS = [
    {"question_id": 1, "text": "A"},     # right
    {"question_id": "2", "text": "B."},  # exact match only: wrong
    {"question_id": 3, "text": "c"},     # case-sensitive: wrong
    {"question_id": "v4", "text": "D"},  # right (video)
]


def test_seed_by_hand():
    results = {a["question_id"]: a for a in SEED_ANSWERS}  # question 5 unanswered: wrong
    m = seed.score_seed(SEED_ANNOTATION, results)
    # type 1: q1 right, q2 wrong -> 50%; type 2: v4 right of 3, 4, 5 -> 1/3; total 2/5
    assert m["per_type"] == {"Scene Understanding": 50.0, "Instance Identity": pytest.approx(100 / 3)}
    assert m["total"] == 40.0
    assert m["image"] == 25.0 and m["video"] == 100.0  # image: 1 of 4; video: 1 of 1


def test_seed_front_door(tmp_path):
    ann = tmp_path / "seed.json"
    ann.write_text(json.dumps(SEED_ANNOTATION))
    answers = write_jsonl(tmp_path / "a.jsonl", SEED_ANSWERS + [{"question_id": 5, "text": "B"}])
    upload = tmp_path / "up.jsonl"
    out = run("llava.eval.convert_seed_for_submission", "--annotation-file", ann, "--result-file", answers,
              "--result-upload-file", upload)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["Scene Understanding: 50.00%", "Instance Identity: 33.33%",
                                       "Total accuracy: 40.00%", "image accuracy: 25.00%", "video accuracy: 100.00%"]
    assert [json.loads(x) for x in upload.read_text().splitlines()] == [
        {"question_id": "1", "prediction": "A"}, {"question_id": "2", "prediction": "B."},
        {"question_id": "3", "prediction": "c"}, {"question_id": "v4", "prediction": "D"},
        {"question_id": "5", "prediction": "B"}]
    write_jsonl(answers, SEED_ANSWERS)  # question 5 missing: the upload cannot be written
    out = run("llava.eval.convert_seed_for_submission", "--annotation-file", ann, "--result-file", answers,
              "--result-upload-file", upload)
    assert out.returncode == 2 and "question_id '5'" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- MMBench

MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
               "comment", "split", "image"]


def write_mmbench(tmp_path: Path) -> Path:
    rows = [["0", "Which pet?", "h", "cat", "dog", "bird", "", "B", "c", "s", "l2", "", "dev", "aGk="],
            ["1", "Which colour?", "", "red", "blue", "", "", "A", "c", "s", "l2", "", "dev", "aGk="],
            ["2", "Which?", "", "w", "x", "y", "z", "D", "c", "s", "l2", "", "dev", "aGk="]]
    path = tmp_path / "mmb.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows([MMB_COLUMNS] + rows)
    return path


def test_mmbench_letters():
    opts = ["cat", "dog", "bird", "fish"]
    assert mmbench.parse_letter("B", opts) == "B"
    assert mmbench.parse_letter(" C. bird", opts) == "C"
    assert mmbench.parse_letter("B) dog", opts) == "B"
    assert mmbench.parse_letter("Dog.", opts) == "B"           # option text instead of a letter
    assert mmbench.parse_letter("E", opts) is None             # out of range
    assert mmbench.parse_letter("The answer is A", opts) is None
    assert mmbench.parse_letter("", opts) is None
    row = {"A": "cat", "B": "dog", "C": "bird", "D": "", "answer": "B"}
    # without recorded options: dog (index 1) in round 1 is shown as (1 - 1) % 3 = A; round 2 -> C
    assert mmbench.right_letter(row, {"round_id": 1}) == "A"
    assert mmbench.right_letter(row, {"round_id": 2}) == "C"


def test_mmbench_front_door(tmp_path):
    tsv = write_mmbench(tmp_path)
    (tmp_path / "res").mkdir()
    write_jsonl(tmp_path / "res" / "exp.jsonl", [
        {"question_id": 0, "round_id": 0, "options": ["cat", "dog", "bird"], "text": "B"},   # dog is B: right
        {"question_id": 0, "round_id": 1, "options": ["dog", "bird", "cat"], "text": "A."},  # dog is A: right
        {"question_id": 0, "round_id": 2, "options": ["bird", "cat", "dog"], "text": "dog"},  # text -> C: right
        {"question_id": 1, "round_id": 0, "options": ["red", "blue"], "text": "The answer is A"},  # no letter
        {"question_id": 1, "round_id": 1, "options": ["blue", "red"], "text": "B"},          # red is B: right
    ])
    out = run("llava.eval.convert_mmbench_for_submission", "--annotation-file", tsv, "--result-dir",
              tmp_path / "res", "--upload-dir", tmp_path / "up", "--experiment", "exp")
    assert out.returncode == 0, out.stderr
    # question 0 right in all 3 rounds, question 1 wrong in round 0 -> 1 of 2 answered questions
    assert "Local circular accuracy: 50.00% (1/2 questions, 5 rounds; all rounds must be right)" in out.stdout
    try:
        import openpyxl
    except ImportError:
        assert "openpyxl is not installed" in out.stdout
        with open(tmp_path / "up" / "exp.tsv", encoding="utf-8", newline="") as f:
            table = list(csv.reader(f, delimiter="\t"))
    else:
        sheet = openpyxl.load_workbook(tmp_path / "up" / "exp.xlsx").active
        table = [["" if v is None else str(v) for v in r] for r in sheet.iter_rows(values_only=True)]
    # hint/category/source/image/comment/l2-category dropped; prediction inserted at position 6;
    # the last round's answer wins
    assert table[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table[1][6] == "dog" and table[2][6] == "B" and table[3][6] == ""


def test_mmbench_unknown_question(tmp_path):
    tsv = write_mmbench(tmp_path)
    (tmp_path / "res").mkdir()
    write_jsonl(tmp_path / "res" / "exp.jsonl", [{"question_id": 0, "text": "B"}, {"question_id": 7, "text": "A"}])
    with pytest.raises(DataError, match="exp.jsonl, line 2: question_id 7"):
        mmbench.score_from_args(args_for(mmbench, ["--annotation-file", tsv, "--result-dir", tmp_path / "res",
                                                   "--upload-dir", tmp_path / "up", "--experiment", "exp"]))


def test_llava_eval_score_front_end(pope_files):
    """`llava eval score BENCH` runs the benchmark's own scorer: the original's printout, or --json."""
    ann, questions, answers = pope_files
    flags = ["--annotation-dir", ann, "--question-file", questions, "--result-file", answers]
    printed = run("llava.cli", "eval", "score", "pope", *flags)
    original = run("llava.eval.eval_pope", *flags)
    assert printed.returncode == 0 and printed.stdout == original.stdout
    as_json = run("llava.cli", "eval", "score", "pope", *flags, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["average_f1"] == 0.5  # (1 + 0) / 2, as above
    unknown = run("llava.cli", "eval", "score", "popo", *flags)
    assert unknown.returncode == 2 and unknown.stderr.strip().count("\n") == 0 and "known: gqa" in unknown.stderr
