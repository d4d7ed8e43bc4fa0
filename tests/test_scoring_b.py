"""Scorers part B: the EvalAI normaliser, TextVQA, VQAv2, VizWiz and GQA, as LLaVA's scripts score them.

Every expected number below is worked out by hand in a comment, never read back from the scorer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.errors import DataError, InputError
from llava.eval.scoring import gqa, textvqa, vizwiz, vqav2
from llava.eval.scoring.vqa_normalize import normalize_answer, vqa_accuracy

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = "Answer the question using a single word or phrase."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=False)


# ---- the EvalAI answer processor ----------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                                    # lowercased, number word -> digit
    ("none", "0"),
    ("Yes, there is a dog.", "yes there is dog"),    # comma gone, final period gone, article dropped
    ("3.5", "3.5"),                                  # a period followed by a digit stays
    ("It is 3.5.", "it is 3.5"),                     # ...the sentence-end one goes
    (".5", ".5"),                                    # malformed lookbehind: only the lookahead counts
    ("a.b", "ab"),                                   # inner period not before a digit: deleted
    ("dont", "don't"),                               # contraction table
    ("Im", "im"),                                    # capitalised table key never matches lowercase text
    ("somebody'd", "somebodyd"),                     # the table's odd entry
    ("The cat's toy", "cat 's toy"),                 # 's split off, 'the' dropped
    ("a-b", "b"),                                    # '-' touches no space -> space; then 'a' is an article
    ("x - y", "x y"),                                # '-' touches a space -> deleted
    ("(see) this", "see this"),                      # '(' spaced out, ')' before a space deleted
    ("Hello!", "hello"),                             # '!' -> space, then words re-joined
    ("10,000", "10000"),                             # commas are removed before anything else
    ("what?\tnow\n", "what now"),                    # '?' removed, tab/newline -> space
    ("An apple", "apple"),
    ("", ""),
])
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_period_count_quirk() -> None:
    # re.UNICODE (32) is passed as sub's count: of 40 periods not before a digit, 32 go, 8 stay
    assert normalize_answer("x" + "." * 40) == "x" + "." * 8


@pytest.mark.parametrize("n_match, expected", [
    # n of 10 annotators gave the prediction's normal form. Leaving out one of those n leaves n-1
    # matches, leaving out any of the others leaves n; mean over the 10 subsets of min(1, k/3):
    (3, 0.9),   # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10
    (2, 0.6),   # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
    (1, 0.3),   # (1 * 0 + 9 * 1/3) / 10 = 3/10
    (4, 1.0),   # at least 3 matches are left in every subset
    (0, 0.0),   # no annotator gave it
])
def test_vqa_accuracy(n_match: int, expected: float) -> None:
    gt = ["two"] * n_match + ["three"] * (10 - n_match)
    assert vqa_accuracy("Two.", gt) == pytest.approx(expected)


def test_accuracy_normalises_ground_truth_too() -> None:
    # "2 dogs", "two dogs", "The two dogs" all become "2 dogs": 3 matches of 10 -> 0.9 as above
    gt = ["2 dogs", "two dogs", "The two dogs"] + ["dogs"] * 7
    assert vqa_accuracy("Two dogs.", gt) == pytest.approx(0.9)


# ---- TextVQA ------------------------------------------------------------------------------------

def textvqa_files(tmp_path: Path) -> tuple[Path, Path]:
    annotations = {"data": [
        {"image_id": "img1", "question": "What brand is this?", "answers": ["nokia"] * 10},
        {"image_id": "img2", "question": "how many cups?", "answers": ["two"] * 3 + ["three"] * 7},
        {"image_id": "img3", "question": "what does it say?", "answers": ["stop"] * 10},
        {"image_id": "img4", "question": "what color?", "answers": ["red"] * 2 + ["blue"] * 8},
    ]}
    ann = tmp_path / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps(annotations))
    answers = write_jsonl(tmp_path / "answers.jsonl", [
        # the question line is matched lowercased: "What brand is this?" -> "what brand is this?"
        {"question_id": "img1", "prompt": f"What brand is this?\nReference OCR token: nokia\n{SUFFIX}",
         "text": "Nokia."},                                        # "nokia": 10 of 10 -> 1.0
        {"question_id": "img2", "prompt": f"how many cups?\nReference OCR token: 2\n{SUFFIX}",
         "text": "Two"},                                           # "2": 3 of 10 -> 0.9
        {"question_id": "img3", "prompt": f"what does it say?\n{SUFFIX}", "text": ""},  # empty -> 0
        {"question_id": "img4", "prompt": f"Reference OCR token: x\nwhat color?\n{SUFFIX}",
         "text": "Red"},                                           # OCR line first; 2 of 10 -> 0.6
    ])
    return ann, answers


def test_textvqa_score(tmp_path: Path) -> None:
    ann, answers = textvqa_files(tmp_path)
    metrics = textvqa.score(ann, answers)
    # (1.0 + 0.9 + 0 + 0.6) / 4 = 0.625 -> 62.5%
    assert metrics["samples"] == 4
    assert metrics["accuracy"] == pytest.approx(62.5)
    assert textvqa.format_metrics(metrics) == "answers\nSamples: 4\nAccuracy: 62.50%\n"


def test_textvqa_prompt_shapes() -> None:
    assert textvqa.prompt_question("OCR tokens: a b Question: What Is It? Short answer:") == "what is it?"
    assert textvqa.prompt_question("one line only") is None      # the original asserts here


def test_textvqa_front_door(tmp_path: Path) -> None:
    ann, answers = textvqa_files(tmp_path)
    done = run_module("llava.eval.eval_textvqa", "--annotation-file", str(ann), "--result-file", str(answers))
    assert done.returncode == 0, done.stderr
    # print() adds a newline after the original's trailing "\n": a blank line ends the output
    assert done.stdout == "answers\nSamples: 4\nAccuracy: 62.50%\n\n"


def test_textvqa_bad_inputs(tmp_path: Path) -> None:
    ann, answers = textvqa_files(tmp_path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(answers.read_text().splitlines()[0] + "\n{not json\n")
    done = run_module("llava.eval.eval_textvqa", "--annotation-file", str(ann), "--result-file", str(broken))
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert "broken.jsonl" in done.stderr and "line 2" in done.stderr
    other = write_jsonl(tmp_path / "other.jsonl", [
        {"question_id": "imgX", "prompt": f"what is this?\n{SUFFIX}", "text": "a"}])
    with pytest.raises(DataError, match="another question set"):
        textvqa.score(ann, other)
    with pytest.raises(InputError, match="missing.jsonl: no such file"):
        textvqa.score(ann, tmp_path / "missing.jsonl")


# ---- VQAv2 --------------------------------------------------------------------------------------

def vqav2_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    split = write_jsonl(tmp_path / "test2015.jsonl", [{"question_id": i, "text": "q"} for i in (1, 2, 3)])
    src = write_jsonl(tmp_path / "merge.jsonl", [
        {"question_id": 1, "text": "Yes, there is."},
        {"question_id": 2, "text": "no"},
        {"question_id": 2, "text": "Two dogs."},       # a repeated id: the last answer wins
    ])                                                  # question 3 has no answer
    ann = tmp_path / "val_annotations.json"
    ann.write_text(json.dumps({"annotations": [
        {"question_id": 1, "answers": [{"answer": "Yes there is"}] + [{"answer": "yes"}] * 9},
        {"question_id": 2, "answers": [{"answer": a} for a in ["2 dogs"] * 2 + ["two dogs"] * 2 + ["dogs"] * 6]},
        {"question_id": 3, "answers": [{"answer": "no"}] * 10},
    ]}))
    return split, src, ann


def test_vqav2_submission_and_local_accuracy(tmp_path: Path) -> None:
    split, src, ann = vqav2_files(tmp_path)
    dst = tmp_path / "upload" / "ckpt.json"
    metrics = vqav2.convert(src, split, dst, ann)
    assert json.loads(dst.read_text()) == [
        {"question_id": 1, "answer": "yes there is"},   # comma and final period removed
        {"question_id": 2, "answer": "2 dogs"},
        {"question_id": 3, "answer": ""},               # missing -> empty answer
    ]
    # two distinct ids answered, three questions listed
    assert (metrics["total_results"], metrics["total_split"], metrics["missing"]) == (2, 3, 1)
    # q1: 1 of 10 said "yes there is" -> 0.3; q2: 4 of 10 normalise to "2 dogs" -> 1.0;
    # q3: '' matches nobody -> 0.  (0.3 + 1.0 + 0) / 3 = 0.4333... -> 43.33%
    assert metrics["accuracy"] == pytest.approx(130 / 3)
    assert vqav2.format_metrics(metrics) == ("total results: 2, total split: 3, error_line: 0\n"
                                             "Accuracy: 43.33% (3 questions)")


def test_vqav2_front_door_upstream_layout(tmp_path: Path) -> None:
    split, src, _ = vqav2_files(tmp_path)
    (tmp_path / "llava_vqav2_mscoco_test2015.jsonl").write_text(split.read_text())
    answers_dir = tmp_path / "answers" / "test-dev" / "m"
    answers_dir.mkdir(parents=True)
    (answers_dir / "merge.jsonl").write_text(src.read_text())
    done = run_module("llava.eval.convert_vqav2_for_submission", "--dir", str(tmp_path),
                      "--split", "test-dev", "--ckpt", "m")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "total results: 2, total split: 3, error_line: 0\n"
    assert len(json.loads((tmp_path / "answers_upload" / "test-dev" / "m.json").read_text())) == 3


def test_vqav2_bad_inputs(tmp_path: Path) -> None:
    split, _, _ = vqav2_files(tmp_path)
    other = write_jsonl(tmp_path / "other.jsonl", [{"question_id": 7, "text": "yes"}])
    done = run_module("llava.eval.convert_vqav2_for_submission", "--src", str(other),
                      "--test-split", str(split), "--dst", str(tmp_path / "out.json"))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "another question set" in done.stderr
    assert not (tmp_path / "out.json").exists()


# ---- VizWiz -------------------------------------------------------------------------------------

def test_vizwiz_upload_and_local_accuracy(tmp_path: Path) -> None:
    questions = write_jsonl(tmp_path / "llava_test.jsonl", [
        {"question_id": 0, "image": "a.jpg", "answers": ["unanswerable"] * 6 + ["blue"] * 4},
        {"question_id": 1, "image": "b.jpg", "answers": ["blue"] + ["navy"] * 9},
    ])
    results = write_jsonl(tmp_path / "merge.jsonl", [
        {"question_id": 0, "text": "Unanswerable."}, {"question_id": 1, "text": "Blue"}])
    upload = tmp_path / "up" / "answers.json"
    done = run_module("llava.eval.convert_vizwiz_for_submission", "--annotation-file", str(questions),
                      "--result-file", str(results), "--result-upload-file", str(upload))
    assert done.returncode == 0, done.stderr
    # q0: "unanswerable" 6 of 10 -> 1.0; q1: "blue" 1 of 10 -> 0.3; (1.0 + 0.3) / 2 = 65%
    assert done.stdout == ("total results: 2, total split: 2, error_line: 0\n"
                           "Accuracy: 65.00% (2 questions)\n")
    assert json.loads(upload.read_text()) == [{"image": "a.jpg", "answer": "unanswerable"},
                                              {"image": "b.jpg", "answer": "blue"}]


def test_vizwiz_missing_answer(tmp_path: Path) -> None:
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "a.jpg"},
                                                   {"question_id": 1, "image": "b.jpg"}])
    results = write_jsonl(tmp_path / "r.jsonl", [{"question_id": 0, "text": ""}])
    with pytest.raises(DataError, match="no answer for question_id 1"):
        vizwiz.convert(questions, results, tmp_path / "u.json")
    # an empty answer is kept empty (upstream has no "unanswerable" fallback)
    write_jsonl(results, [{"question_id": 0, "text": ""}, {"question_id": 1, "text": "red"}])
    metrics = vizwiz.convert(questions, results, tmp_path / "u.json")
    assert "accuracy" not in metrics        # these question rows carry no human answers
    assert json.loads((tmp_path / "u.json").read_text())[0] == {"image": "a.jpg", "answer": ""}


# ---- GQA ----------------------------------------------------------------------------------------

def op(operation: str, argument: str) -> dict:
    return {"operation": operation, "argument": argument}


GQA_QUESTIONS = {
    # 4 words; 2 steps (select, verify color); binary
    "q1": {"isBalanced": True, "question": "Is the cat white?", "answer": "yes", "entailed": ["q3", "q1"],
           "semantic": [op("select", "cat"), op("verify color", "white")],
           "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
           "groups": {"global": None, "local": "x"}},
    # 5 words; "query: name" is not a step -> 2 steps; open
    "q2": {"isBalanced": True, "question": "What is on the table?", "answer": "cup", "entailed": [],
           "semantic": [op("select", "table"), op("relate", "_,on,s"), op("query", "name")],
           "types": {"structural": "query", "semantic": "rel", "detailed": "relS"},
           "groups": {"global": "tableware", "local": "y"}},
    # 5 words; "query: color" is a step -> 2 steps; open; detailed type contains "Common"
    "q3": {"isBalanced": True, "question": "What color is the car?", "answer": "red", "entailed": ["q2"],
           "semantic": [op("select", "car"), op("query", "color")],
           "types": {"structural": "query", "semantic": "obj", "detailed": "colorCommon"},
           "groups": {"global": "color", "local": "z"}},
    # not balanced: never scored, needs no prediction
    "q4": {"isBalanced": False, "question": "x", "answer": "no", "entailed": [], "semantic": [],
           "types": {"structural": "verify", "semantic": "attr", "detailed": "v"}, "groups": {"global": None}},
}


def test_gqa_convert_front_door(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "merge.jsonl", [
        {"question_id": "q1", "text": "Yes."}, {"question_id": "q2", "text": "Plate..."},
        {"question_id": "q3", "text": "RED"}, {"question_id": "q5", "text": "3.5"}])
    dst = tmp_path / "testdev_balanced_predictions.json"
    done = run_module("llava.eval.convert_gqa_for_eval", "--src", str(src), "--dst", str(dst))
    assert done.returncode == 0 and done.stdout == "", done.stderr
    # lowercased, every trailing period stripped, inner ones kept
    assert json.loads(dst.read_text()) == [
        {"questionId": "q1", "prediction": "yes"}, {"questionId": "q2", "prediction": "plate"},
        {"questionId": "q3", "prediction": "red"}, {"questionId": "q5", "prediction": "3.5"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "q1"}\n')
    done = run_module("llava.eval.convert_gqa_for_eval", "--src", str(bad), "--dst", str(dst))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "bad.jsonl, line 1" in done.stderr and "'text'" in done.stderr


def test_gqa_score_and_print(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(GQA_QUESTIONS))
    (tmp_path / "testdev_balanced_predictions.json").write_text(json.dumps([
        {"questionId": "q1", "prediction": "yes"}, {"questionId": "q2", "prediction": "plate"},
        {"questionId": "q3", "prediction": "red"}]))
    t = str(tmp_path / "{tier}")
    argv = ["--tier", "testdev_balanced", "--questions", t + "_questions.json",
            "--predictions", t + "_predictions.json", "--choices", t + "_choices.json"]
    assert gqa.main(argv) == 0
    # correct: q1, q3. accuracy 2/3; binary (q1) 1/1; open (q2, q3) 1/2.
    # distribution: group tableware gold {cup: 1} vs predicted {plate: 1}: (0-1)^2/1 = 1, weight 1;
    # group color: 0, weight 1; (1*1 + 0*1) / 2 = 0.5, /100 = 0.005 (q1's group is None: skipped).
    # no choices file: validity/plausibility omitted. Type names print raw (the original's quirk).
    expected = [
        "Binary: 100.00%", "Open: 50.00%", "Accuracy: 66.67%", "Distribution: 0.01 (lower is better)",
        "", "Accuracy / structural type:", "  query: 50.00% (2 questions)", "  verify: 100.00% (1 questions)",
        "", "Accuracy / semantic type:", "  attr: 100.00% (1 questions)", "  obj: 100.00% (1 questions)",
        "  rel: 0.00% (1 questions)",
        "", "Accuracy / steps number:", "  2: 66.67% (3 questions)",
        "", "Accuracy / words number:", "  4: 100.00% (1 questions)", "  5: 50.00% (2 questions)",
    ]
    assert capsys.readouterr().out.splitlines() == expected


def test_gqa_consistency_validity_and_missing() -> None:
    predictions = {"q1": "yes", "q2": "plate", "q3": "red", "q4": "no"}
    choices = {"q1": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},
               "q2": {"valid": ["cup", "plate"], "plausible": ["cup"]},
               "q3": {"valid": ["red", "blue"], "plausible": ["red"]}}
    m = gqa.score(GQA_QUESTIONS, predictions, choices, consistency=True)
    assert m["distribution"] == pytest.approx(0.005)
    # consistency: q1 correct, entailed [q3] (itself excluded) all right -> 1; q3 correct, entailed
    # [q2] wrong -> 0; q2 wrong -> not counted. mean(1, 0) = 50%
    assert m["consistency"] == pytest.approx(50.0)
    # validity: q1 yes in valid -> 1; q2 plate in valid -> 1; q3 "colorCommon" -> the group becomes
    # [color, material, shape] and "red" is not in it -> 0.  2/3.
    # plausibility: q1 -> 1; q2 plate not in [cup] -> 0; q3 -> 0 (same "Common" rule).  1/3.
    assert m["validity"] == pytest.approx(200 / 3)
    assert m["plausibility"] == pytest.approx(100 / 3)
    with pytest.raises(DataError, match="no prediction for question q2"):
        gqa.score(GQA_QUESTIONS, {"q1": "yes", "q3": "red"})
    with pytest.raises(DataError, match="no prediction for question q4"):   # --consistency needs all
        gqa.score(GQA_QUESTIONS, {"q1": "yes", "q2": "cup", "q3": "red"}, consistency=True)


# ---- layering -----------------------------------------------------------------------------------

def test_scorers_import_no_torch() -> None:
    modules = ["llava.eval.scoring." + m for m in ("vqa_normalize", "textvqa", "vqav2", "vizwiz", "gqa")]
    modules += ["llava.eval." + m for m in ("eval_textvqa", "convert_vqav2_for_submission",
                                            "convert_vizwiz_for_submission", "convert_gqa_for_eval")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
