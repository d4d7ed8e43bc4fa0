"""Judged benchmarks (LLaVA-Bench, MM-Vet) against a real OpenAI-compatible HTTP server on loopback.

The fake judge answers each request from a script keyed by a marker in the request's last
message (the model answer's text), so every question gets the replies the test chose: normal,
comma-separated, unparseable, a 500 before success, a call that always fails, a 401. Expected
numbers are worked out by hand in the comments, never copied from the scorer's output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from judge_helpers import FakeJudge, running_judge
from serve_helpers import free_port

from llava.errors import DataError
from llava.eval import score_cli, summarize_gpt_review
from llava.eval.judge import Judge, JudgeCallFailed
from llava.eval.scoring import llava_bench, mm_vet

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--judge-backoff", "0.01", "--judge-retries", "3", "--judge-timeout", "10"]


@pytest.fixture
def judge():
    with running_judge() as fake:
        yield fake


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, check=False)


# ---------------------------------------------------------------- LLaVA-Bench

CATEGORIES = {1: "conv", 2: "conv", 3: "detail", 4: "detail", 5: "complex", 6: "complex"}


def bench_files(tmp_path: Path) -> list[str]:
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": q, "image": f"{(q + 1) // 2:03d}.jpg", "text": f"Q{q}?",
                                        "category": c} for q, c in CATEGORIES.items()])
    write_jsonl(tmp_path / "ctx.jsonl", [{"image": "001.jpg", "caption": ["A dog.", "A red ball."]},
                                         {"image": "002.jpg", "caption": "One string caption."},
                                         {"image": "003.jpg", "caption": ["A kitchen."]}])
    write_jsonl(tmp_path / "ref.jsonl", [{"question_id": q, "text": f"REF-q{q}", "answer_id": f"r{q}"}
                                         for q in CATEGORIES])
    write_jsonl(tmp_path / "ans.jsonl", [{"question_id": q, "text": f"ANS-q{q}"} for q in CATEGORIES])
    return ["-q", str(tmp_path / "q.jsonl"), "-c", str(tmp_path / "ctx.jsonl"), "-a", str(tmp_path / "ref.jsonl"),
            str(tmp_path / "ans.jsonl"), "-o", str(tmp_path / "reviews" / "review_m.jsonl")]


def script_bench(fake: FakeJudge) -> None:
    fake.script.update({
        "ANS-q1": [(200, "8 7\nAssistant 2 misses a detail.")],
        "ANS-q2": [(200, "7,9")],
        "ANS-q3": [(200, "Assistant 1 is better."), (200, "5 5\nequal")],  # unparseable, then fine on rerun
        "ANS-q4": [(500, "overloaded"), (200, "6 3\nok")],                  # retried within the call
        "ANS-q5": [(503, "down")],                                           # always fails (first run)
        "ANS-q6": [(200, "10, 8\nclose")],                                   # upstream could not parse this
    })


def test_llava_bench_review_resume_and_printout(judge, tmp_path):
    script_bench(judge)
    args = bench_files(tmp_path) + ["--judge-url", judge.url, "--judge-model", "judge-x",
                                    "--judge-key-env", "MY_JUDGE_KEY"] + FAST
    out = cli("eval", "score", "llava_bench", *args, env={"MY_JUDGE_KEY": "sk-test"})
    assert out.returncode == 0, out.stderr
    # parsed: q1 (8,7) q2 (7,9) q4 (6,3) q6 (10,8); q3 unparseable -> (-1,-1) averaged in as upstream;
    # q5 failed, left out. all: s1 = 30/5 = 6.0, s2 = 26/5 = 5.2 -> 86.67 %; conv: 7.5, 8.0 -> 106.67 %
    # detail (-1,-1),(6,3): 2.5, 1.0 -> 40 %; complex: 10, 8 -> 80 %
    assert out.stdout.splitlines() == [
        "review_m",
        "all 86.7 60.0 52.0",
        "llava_bench_complex 80.0 100.0 80.0",
        "llava_bench_conv 106.7 75.0 80.0",
        "llava_bench_detail 40.0 25.0 10.0",
        "=================================",
        "unparseable judge replies: 1 (scored -1 -1 and averaged in, as upstream; a rerun asks again)",
        "failed judge calls: 1 (left out of the means; a rerun asks again)",
    ]
    assert "question 5: judge call failed" in out.stderr and "question 3: unparseable" in out.stderr
    assert judge.count("ANS-q4") == 2 and judge.count("ANS-q5") == 3  # a retry; three attempts

    marker, body, headers = next(c for c in judge.calls if c[0] == "ANS-q1")
    assert body["model"] == "judge-x" and body["temperature"] == 0.2 and body["max_tokens"] == 1024
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["messages"][0] == {"role": "system", "content": llava_bench.SYSTEM}
    rule = json.loads(llava_bench.DEFAULT_RULE.read_text())["llava_bench_conv"]["prompt"]
    assert body["messages"][1]["content"] == (
        "[Context]\nA dog.\nA red ball.\n\n[Question]\nQ1?\n\n[Assistant 1]\nREF-q1\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\nANS-q1\n\n[End of Assistant 2]\n\n[System]\n{rule}\n\n")
    q3 = next(c[1] for c in judge.calls if c[0] == "ANS-q3")["messages"][1]["content"]
    assert q3.startswith("[Context]\nOne string caption.\n\n")  # a string caption is not split

    review = tmp_path / "reviews" / "review_m.jsonl"
    rows = [json.loads(line) for line in review.read_text().splitlines()]
    assert rows[0] == {"id": 1, "question_id": 1, "answer1_id": "r1", "answer2_id": 1, "category": "llava_bench_conv",
                       "content": "8 7\nAssistant 2 misses a detail.", "tuple": [8.0, 7.0]}
    assert next(r for r in rows if r["question_id"] == 5)["failed"] is True

    # rerun: a torn last line (a crash mid-write) is cut; only q3 and q5 are asked again
    judge.script["ANS-q5"] = [(200, "9 6\nbetter now")]
    with review.open("a") as f:
        f.write('{"id": 7, "quest')
    before = len(judge.calls)
    out = cli("eval", "score", "llava_bench", *args, "--json", env={"MY_JUDGE_KEY": "sk-test"})
    assert out.returncode == 0, out.stderr
    assert sorted(c[0] for c in judge.calls[before:]) == ["ANS-q3", "ANS-q5"]
    metrics = json.loads(out.stdout)
    # all six: s1 = 45/6 = 7.5, s2 = 38/6 = 6.333 -> 84.44 %; detail (5,5),(6,3): 5.5, 4.0 -> 72.73 %;
    # complex (9,6),(10,8): 9.5, 7.0 -> 73.68 %
    assert metrics["categories"] == {
        "all": {"relative": 84.4, "reference": 75.0, "model": 63.3, "n": 6},
        "llava_bench_complex": {"relative": 73.7, "reference": 95.0, "model": 70.0, "n": 2},
        "llava_bench_conv": {"relative": 106.7, "reference": 75.0, "model": 80.0, "n": 2},
        "llava_bench_detail": {"relative": 72.7, "reference": 55.0, "model": 40.0, "n": 2},
    }
    assert (metrics["unparseable"], metrics["failed"], metrics["reviewed"]) == (0, 0, 6)
    assert llava_bench.headline(metrics) == ("relative score (all)", 84.4, 100.0)
    ids = [json.loads(line)["question_id"] for line in review.read_text().splitlines()]
    assert sorted(ids) == [1, 2, 3, 4, 5, 6]  # one row per question: failed rows were replaced


def test_llava_bench_401_stops_with_one_line(judge, tmp_path):
    judge.script["ANS-q"] = [(401, "Incorrect API key provided")]
    out = cli("eval", "score", "llava_bench", *bench_files(tmp_path), "--judge-url", judge.url, *FAST)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "HTTP 401 Incorrect API key provided" in out.stderr
    assert len(judge.calls) == 1  # not retried, no further questions asked


def test_llava_bench_input_errors_before_any_call(judge, tmp_path, capsys):
    args = bench_files(tmp_path) + ["--judge-url", judge.url, *FAST]
    write_jsonl(tmp_path / "ans.jsonl", [{"question_id": 1, "text": "only one"}])
    assert score_cli.main(["eval", "score", "llava_bench", *args]) == 2
    assert "has no answer for question_id 2" in capsys.readouterr().err
    bench_files(tmp_path)
    (tmp_path / "rule.json").write_text(json.dumps({"llava_bench_conv": {"role": "Assistant", "prompt": "p"}}))
    assert score_cli.main(["eval", "score", "llava_bench", *args, "--rule", str(tmp_path / "rule.json")]) == 2
    assert "no {role, prompt} entry 'llava_bench_detail'" in capsys.readouterr().err
    assert score_cli.main(["eval", "score", "llava_bench", *args, "--judge-key-env", "NO_SUCH_VAR_X"]) == 2
    assert "NO_SUCH_VAR_X" in capsys.readouterr().err
    assert judge.calls == []


@pytest.mark.parametrize("reply, scores", [
    ("8 7\nbecause", [8.0, 7.0]), ("7,9", [7.0, 9.0]), ("10, 8", [10.0, 8.0]), ("8.5 6", [8.5, 6.0]),
    ("Assistant 1: 8", None), ("8", None), ("8 7 6", None), ("\n8 7", None), ("nan 3", None), ("", None),
])
def test_parse_score(reply, scores):
    assert llava_bench.parse_score(reply) == scores


def test_summarize_upstream_files(tmp_path, capsys):
    # [-1, -1] rows are averaged in, as upstream, and counted. -i drops question 3 (upstream would not:
    # it compares the string "3" with the integer 3).
    rows = [{"question_id": 1, "category": "llava_bench_conv", "tuple": [8, 6]},
            {"question_id": 2, "category": "llava_bench_conv", "tuple": [-1, -1]},
            {"question_id": 3, "category": "llava_bench_detail", "tuple": [1, 1]},
            {"question_id": 4, "tuple": [6, 6]}]  # no category: counts towards all only
    write_jsonl(tmp_path / "gpt4_text_run.jsonl", rows)
    write_jsonl(tmp_path / "notes.jsonl", [{"x": 1}])  # not a review file name: skipped with -d
    assert summarize_gpt_review.main(["-d", str(tmp_path), "-i", "3"]) == 0
    # all: (8,6), (-1,-1), (6,6) -> 13/3 = 4.333, 11/3 = 3.667 (rounded to 3 places first) -> 84.63 %;
    # conv: (8,6), (-1,-1) -> 3.5, 2.5 -> 71.43 %
    assert capsys.readouterr().out.splitlines() == [
        "run", "all 84.6 43.3 36.7", "llava_bench_conv 71.4 35.0 25.0", "=================================",
        "unparseable judge replies: 1 (scored -1 -1 and averaged in, as upstream; a rerun asks again)"]
    assert summarize_gpt_review.main([]) == 2
    assert "-f/--files" in capsys.readouterr().err


# ---------------------------------------------------------------- MM-Vet

MMVET = [  # (capabilities, ground truth, script of replies)
    (["rec"], "cat<OR>kitten", [(200, "1.0")]),
    (["ocr", "rec"], "red<AND>white", [(200, "0.5")]),
    (["ocr"], "42", [(200, "I think"), (200, "??"), (200, "maybe"), (200, "-"), (200, "none")]),
    (["math"], "7", [(200, "0.7\nclose enough")]),
    (["rec", "know"], "Paris", [(503, "down")]),
    (["math"], "9", [(200, "1.5"), (200, "0.9")]),
]


def test_mm_vet_grades_resumes_and_prints(judge, tmp_path, capsys):
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": f"v1_{i}.png", "text": f"Q{i}?", "answer": gt,
                                        "capability": caps} for i, (caps, gt, _) in enumerate(MMVET)])
    (tmp_path / "answers.json").write_text(json.dumps({f"v1_{i}": f"PRED-{i}" for i in range(len(MMVET))}))
    for i, (_, _, replies) in enumerate(MMVET):
        judge.script[f"PRED-{i}"] = list(replies)
    args = ["--question-file", str(tmp_path / "q.jsonl"), "--result-file", str(tmp_path / "answers.json"),
            "--output", str(tmp_path / "grades.jsonl"), "--judge-url", judge.url, *FAST]
    assert score_cli.main(["eval", "score", "mm_vet", *args]) == 0
    out = capsys.readouterr()
    # graded: 1.0, 0.5, 0.0 (five unparseable replies), 0.7, 0.9; question 4 failed.
    # rec (q0, q1) 75.0; ocr (q1, q2) 25.0; math (q3, q5) 80.0; total 3.1/5 = 62.0
    lines = out.out.splitlines()
    assert lines[:5] == ["capability    score     n", "rec            75.0     2", "ocr            25.0     2",
                         "math           80.0     2", "total          62.0     5"]
    assert "rec_ocr" in out.out and lines[-2:] == [
        "unparseable judge replies: 1 (scored 0.0, as the official grader does)",
        "failed judge calls: 1 (left out of the scores; a rerun grades them)"]
    rows = [json.loads(line) for line in (tmp_path / "grades.jsonl").read_text().splitlines()]
    assert rows[2] == {"question_id": 2, "capability": ["ocr"], "answer": "42", "prediction": "PRED-2",
                       "content": ["I think", "??", "maybe", "-", "none"], "score": 0.0, "unparseable": True}
    q2 = [c[1] for c in judge.calls if c[0] == "PRED-2"]
    assert [b["temperature"] for b in q2] == [0.0, 0.0, 0.5, 1.0, 1.5]
    assert q2[0]["max_tokens"] == 3 and q2[0]["messages"][0]["content"].endswith("Q2? | 42 | PRED-2 | ")
    assert mm_vet.NUDGE not in q2[0]["messages"][0]["content"] and q2[1]["messages"][0]["content"].endswith(
        mm_vet.NUDGE)
    q1 = next(c[1] for c in judge.calls if c[0] == "PRED-1")["messages"][0]["content"]
    assert q1.endswith("Q1? | red <AND> white | PRED-1 | ")

    judge.script["PRED-4"] = [(200, "0.4")]
    before = len(judge.calls)
    assert score_cli.main(["eval", "score", "mm_vet", *args, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert [c[0] for c in judge.calls[before:]] == ["PRED-4"]  # the unparseable 0.0 is final, not re-asked
    # rec (1.0, 0.5, 0.4) -> 63.33; know 40.0; total 3.5/6 = 58.33
    assert metrics["capabilities"]["rec"] == {"score": pytest.approx(190 / 3), "n": 3}
    assert metrics["capabilities"]["know"] == {"score": pytest.approx(40.0), "n": 1}
    assert list(metrics["capabilities"]) == ["rec", "ocr", "know", "math"]
    assert mm_vet.headline(metrics) == ("total", pytest.approx(350 / 6), 100.0)
    assert (metrics["unparseable"], metrics["failed"], metrics["graded"]) == (1, 0, 6)
    assert metrics["combinations"]["rec_know"] == {"score": pytest.approx(40.0), "n": 1}


def test_mm_vet_reads_the_official_question_file(tmp_path):
    (tmp_path / "mm-vet.json").write_text(json.dumps({"v1_0": {"imagename": "v1_0.png", "capability": ["ocr"],
                                                               "question": "Q?", "answer": "A"}}))
    assert mm_vet.load_questions(str(tmp_path / "mm-vet.json")) == [
        {"question_id": "v1_0", "id": "0", "question": "Q?", "answer": "A", "capability": ["ocr"]}]
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "text": "Q", "answer": "A", "capability": ["ocr"]}] * 2)
    with pytest.raises(DataError, match="question_id 1 repeats"):
        mm_vet.load_questions(str(tmp_path / "q.jsonl"))


@pytest.mark.parametrize("reply, score", [
    ("1.0", 1.0), ("0.5\nbecause", 0.5), (" 0.3 ", 0.3), ("0", 0.0), ("1.5", None), ("-0.1", None),
    ("nan", None), ("Correct", None), ("", None),
])
def test_parse_grade(reply, score):
    assert mm_vet.parse_grade(reply) == score


# ---------------------------------------------------------------- the client and the import rule

def test_connection_refused_is_a_failed_call_after_retries():
    client = Judge(f"http://127.0.0.1:{free_port()}/v1", "m", attempts=2, backoff=0.01, timeout=2)
    with pytest.raises(JudgeCallFailed, match="after 2 attempts"):
        client.chat([{"role": "user", "content": "hi"}], 0.0, 3)


def test_judged_scorers_import_neither_torch_nor_the_model():
    modules = ["llava.eval.judge", "llava.eval.scoring.llava_bench", "llava.eval.scoring.mm_vet",
               "llava.eval.eval_gpt_review_bench", "llava.eval.summarize_gpt_review"]
    code = ("import sys; import " + ", ".join(modules) + "; print('torch' in sys.modules, "
            "'transformers' in sys.modules, any(m.startswith('llava.model') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.stdout.strip() == "False False False", out.stderr
