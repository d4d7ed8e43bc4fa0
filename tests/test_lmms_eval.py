"""lmms-eval runs our engine: the real CLI, our plugin model, a local task from the synthetic world.

Skipped where lmms-eval is not installed (it is an optional extra, `llava[lmms]`; see
`llava/integrations/lmms_eval/__init__.py` for what it needs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'llava[lmms]')")

from llava.api import DEFAULT_MODEL  # noqa: E402
from llava.data.synth import generate  # noqa: E402
from llava.eval.synth import evaluate  # noqa: E402
from llava.integrations.lmms_eval.tasks.llava_synth.make_task import write_task  # noqa: E402

N_QUESTIONS = 21  # three per category
BATCH = 8


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """Write the data and the task, then run `python -m lmms_eval` with our model over it, once."""
    root = tmp_path_factory.mktemp("lmms_eval")
    data = root / "data"
    generate(data, seed=0, n=0, eval_n=N_QUESTIONS)
    task_yaml = write_task(data)
    out = root / "out"
    # No LMMS_EVAL_PLUGINS: lmms-eval finds `llava_pkg` through our pyproject's entry point, as a user's would.
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "llava_pkg",
           "--model_args", f"pretrained={DEFAULT_MODEL},batch_size={BATCH},device=cpu",
           "--tasks", "llava_synth", "--include_path", str(task_yaml.parent),
           "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lmms-eval failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob("*_samples_llava_synth.jsonl"))
    assert results and samples, f"no results/samples under {out}: {sorted(p.name for p in out.rglob('*'))}"
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    return {"data": data, "results": json.loads(results[-1].read_text()), "samples": rows, "stdout": proc.stdout}


@pytest.fixture(scope="module")
def ours(run, tmp_path_factory) -> dict:
    """Our own scorer on the same questions with the same model and batch size."""
    import llava

    answers = tmp_path_factory.mktemp("ours") / "answers.jsonl"
    pipe = llava.load(str(DEFAULT_MODEL), device="cpu")
    result = evaluate(pipe, run["data"] / "eval.jsonl", run["data"], batch_size=BATCH, max_new_tokens=8,
                      answers_file=answers)
    result["answers"] = {r["question_id"]: r["text"] for r in map(json.loads, answers.read_text().splitlines())}
    return result


def test_lmms_eval_reports_our_scorer_s_numbers(run, ours):
    metrics = run["results"]["results"]["llava_synth"]
    assert run["results"]["n-samples"]["llava_synth"]["effective"] == N_QUESTIONS
    assert metrics["exact_match,none"] == ours["overall"]
    for category, accuracy in ours["accuracy"].items():
        assert metrics[f"acc_{category},none"] == accuracy, category
    assert metrics["exist_f1,none"] == ours["exist"]["f1"]
    assert 50.0 <= metrics["exact_match,none"] <= 100.0  # the shipped model sees: far above chance (~27%)
    assert "exact_match" in run["stdout"]  # lmms-eval's own results table


def test_lmms_eval_got_our_engine_s_answers(run, ours):
    """Every logged response is the answer our engine gives to that question, through the same template."""
    assert len(run["samples"]) == N_QUESTIONS
    for sample in run["samples"]:
        qid = sample["exact_match"]["question_id"]
        response = sample["filtered_resps"]
        response = response[0] if isinstance(response, list) else response
        assert response == ours["answers"][qid], qid


def test_loglikelihood_prefers_the_answer_the_model_generates(run):
    """loglikelihood ranks candidate answers (lmms-eval's multiple-choice path) as generation answers."""
    import PIL.Image
    from lmms_eval.api.instance import Instance

    from llava.integrations.lmms_eval.models.llava_pkg import LlavaPkg

    model = LlavaPkg.create_from_arg_string(f"pretrained={DEFAULT_MODEL},batch_size=4,device=cpu",
                                            {"batch_size": 1, "device": None})  # model_args win over the CLI's
    assert model.batch_size == 4
    docs = [json.loads(line) for line in
            (run["data"] / "lmms_eval_task" / "llava_synth.jsonl").read_text().splitlines()][:4]
    model.task_dict = {"t": {"test": docs}}

    def visuals(doc: dict) -> list:
        return [PIL.Image.open(doc["image"])]

    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    generated = model.generate_until([
        Instance("generate_until", (d["text"], {"max_new_tokens": 8, "do_sample": False}, visuals, i, "t", "test"),
                 idx=0, metadata=meta)
        for i, d in enumerate(docs)])
    candidates = sorted({" " + d["answer"] for d in docs} | {" " + g for g in generated})
    for i, (doc, answer) in enumerate(zip(docs, generated)):
        scores = model.loglikelihood([Instance("loglikelihood", (doc["text"], c, visuals, i, "t", "test"), idx=0,
                                               metadata=meta) for c in candidates])
        best = max(range(len(candidates)), key=lambda k: scores[k][0])
        assert candidates[best] == " " + answer, (doc["text"], candidates, scores)
        assert scores[best][1] and all(s <= 0 for s, _ in scores)


def test_unknown_model_args_are_refused():
    from llava.integrations.lmms_eval.models.llava_pkg import LlavaPkg

    with pytest.raises(TypeError, match="batch_szie"):
        LlavaPkg(batch_szie=8)


def test_the_plugin_names_our_class():
    from llava.integrations.lmms_eval import CLASS_PATH, MODEL_NAME
    from llava.integrations.lmms_eval.models import AVAILABLE_MODELS

    assert CLASS_PATH == f"llava.integrations.lmms_eval.models.{MODEL_NAME}.{AVAILABLE_MODELS[MODEL_NAME]}"
    assert Path(__file__).parent.parent.joinpath("llava", "integrations", "lmms_eval", "tasks", "__init__.py").is_file()
    # the older plugin variable still resolves to the same class
    env = {k: v for k, v in os.environ.items() if k != "LMMS_EVAL_PLUGINS"} | {
        "LMMS_EVAL_PLUGINS": "llava.integrations.lmms_eval"}
    found = subprocess.run([sys.executable, "-c", "from lmms_eval.models import get_model; "
                            "c = get_model('llava_pkg'); print(c.__module__ + '.' + c.__name__)"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert found.stdout.strip() == CLASS_PATH, found.stderr[-2000:]
