"""The shipped tiny model (llava/assets/tiny-llava): it sees, and its card tells the truth."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import llava
from llava.api import DEFAULT_MODEL
from llava.data.synth import answer_vocab, generate
from llava.eval.synth import TARGETS, evaluate, grounding_check, normalize_answer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = json.loads((DEFAULT_MODEL / "eval_results.json").read_text())
TOLERANCE = 4.0  # percentage points: another Pillow can rasterise the printed words a little differently


@pytest.fixture(scope="module")
def pipe():
    return llava.load(device="cpu")  # no path: the bundled model


def _ask_examples(pipe):
    rows = [json.loads(line) for line in (ROOT / "examples" / "synth_questions.jsonl").read_text().splitlines()]
    answers = pipe.generate([r["text"] for r in rows], images=[str(ROOT / r["image"]) for r in rows],
                            temperature=0, max_new_tokens=8)
    return rows, answers


def test_answers_example_questions_in_each_category_s_vocabulary(pipe):
    rows, answers = _ask_examples(pipe)
    for r, a in zip(rows, answers):
        vocab = {normalize_answer(v, r["category"]) for v in answer_vocab(r["category"])}
        assert normalize_answer(a, r["category"]) in vocab, (r["image"], r["text"], a)


def test_the_card_meets_every_target():
    """The shipped card meets the issue's targets (a re-shipped model cannot quietly lose one)."""
    met = {c for c, acc in RESULTS["real"]["accuracy"].items() if acc >= TARGETS[c]}
    assert met == set(RESULTS["real"]["accuracy"]) == {"color", "shape", "count", "exist", "position", "word", "mc"}
    assert RESULTS["real"]["exist_f1"] >= TARGETS["exist_f1"]


# The shipped model's misses among the examples. The classic model (`--size classic`) missed two, each
# of a kind it got wrong now and then on held-out data too: a hard negative (a gray diamond and a
# green triangle, no gray triangle) and a count of two small stars picked by letter. The model with
# the varied phase answers all eight, in fp32 and in bf16: a re-shipped model may miss none.
KNOWN_MISSES: set[str] = set()


def test_answers_example_questions_correctly_but_for_its_known_misses(pipe):
    rows, answers = _ask_examples(pipe)
    wrong = {r["image"]: a for r, a in zip(rows, answers)
             if normalize_answer(a, r["category"]) != normalize_answer(r["answer"], r["category"])}
    assert set(wrong) <= KNOWN_MISSES, wrong
    assert len(rows) - len(wrong) >= 6


def test_card_says_how_the_shipped_model_was_made():
    """The card's command (`--size full`) is the recipe that made it, and where its stages ran apart or
    beside other work, the card says so under the times."""
    from llava.recipe.sizes import SIZES, RecipeSize
    from llava.dataclass_cli import saved_value

    summary = json.loads((DEFAULT_MODEL / "recipe_summary.json").read_text())
    card = (DEFAULT_MODEL / "README.md").read_text()
    assert summary["size"] == "full" and f"llava recipe tiny --size full --seed {summary['seed']}" in card
    now = json.loads(json.dumps(dataclasses.asdict(SIZES["full"])))
    for name in now:  # a field added since the model was made counts as its default
        nested = getattr(SIZES["full"], name)
        then = saved_value(RecipeSize, summary["spec"], name,
                           nested=type(nested) if dataclasses.is_dataclass(nested) else None)
        assert json.loads(json.dumps(then)) == now[name], name
    assert summary.get("provenance", "") in card
    assert f"| total | {summary['total_seconds']:.1f} |" in card


def test_card_says_how_the_model_frames_a_picture_and_what_a_crop_would_cut_off():
    """The card says how the image processor frames a non-square picture (the model's aspect mode),
    and how many out-of-style questions are about objects a centre crop keeps: a square-mode model
    sees only those, so it cannot reach the count target; a padded one sees them all."""
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    square = config["llava_extra"].get("image_aspect_ratio", "square") == "square"
    card = (DEFAULT_MODEL / "README.md").read_text()
    if square:
        assert "centre-cropped to a square" in card and "padded to a square" not in card
        assert "A centre crop (this model's square mode) keeps" in card
    else:
        assert "padded to a square" in card and "centre-cropped to a square" not in card
        assert "A centre crop (a square-mode model; this one sees the whole picture) keeps" in card
    crop = RESULTS["out_of_style"]["after_crop"]
    for category, share in crop["share"].items():
        assert f"{category} {share:.0f}%" in card and 0 < share <= 100
        assert f"{category} {crop['accuracy'][category]:.1f}" in card
    assert crop["share"]["count"] < 85  # below the count target: why square mode cannot reach it


def test_grounding_check_of_the_card():
    """With blank images every category of the card sits within 10 points of chance among the
    answers it gives from the category's set (so they come from the image, not from priors; a
    "No" to "left or right?" declines), and the overall score drops well below the real one."""
    for category, check in grounding_check(RESULTS["blank"], RESULTS["chance"]).items():
        assert check["ok"], (category, check)
    assert RESULTS["real"]["overall"] > RESULTS["blank"]["overall"] + 5
    card = (DEFAULT_MODEL / "README.md").read_text()
    assert "`llava.eval.synth.grounding_check`" in card


def test_shipped_files_name_no_folder_of_the_machine_that_trained_it():
    """Paths in the shipped JSON files are the card's `$OUT/...` (or relative), never an absolute
    path of the run folder where the model was trained."""
    def strings(value):
        if isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)
        elif isinstance(value, str):
            yield value

    for path in set(DEFAULT_MODEL.glob("*.json")) - {DEFAULT_MODEL / "tokenizer.json"}:  # that one: vocabulary
        absolute = [s for s in strings(json.loads(path.read_text())) if s.startswith("/") or s[1:3] == ":\\"]
        assert not absolute, (path.name, absolute[:3])


def test_card_records_the_numbers_of_eval_results():
    card = (DEFAULT_MODEL / "README.md").read_text()
    for category, acc in RESULTS["real"]["accuracy"].items():
        assert f"| {category} |" in card and f"{acc:.1f}" in card
    assert sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir()) <= 20e6


@pytest.fixture(scope="module")
def fresh(pipe, tmp_path_factory):
    """The card's held-out set, regenerated from its seed, answered again by the shipped weights."""
    root = tmp_path_factory.mktemp("heldout")
    generate(root, seed=RESULTS["eval_seed"], n=0, eval_n=RESULTS["eval_n"])
    sha = hashlib.sha256((root / "eval.jsonl").read_bytes()).hexdigest()
    assert sha == RESULTS["eval_sha256"], "the synthetic eval questions changed since the card was written"
    real = evaluate(pipe, root / "eval.jsonl", root, batch_size=50)
    blank = evaluate(pipe, root / "eval.jsonl", root, batch_size=50, blank_images=True)
    return real, blank


@pytest.mark.slow
def test_card_metrics_match_a_fresh_evaluation(fresh):
    real, blank = fresh
    for category, acc in RESULTS["real"]["accuracy"].items():
        assert abs(real["accuracy"][category] - acc) <= TOLERANCE, (category, real["accuracy"][category], acc)
    for category, acc in RESULTS["blank"]["accuracy"].items():
        assert abs(blank["accuracy"][category] - acc) <= TOLERANCE, (category, blank["accuracy"][category], acc)


@pytest.fixture(scope="module")
def out_of_style(pipe, tmp_path_factory):
    """The card's out-of-style set, regenerated from its seed, answered again by the shipped weights."""
    from llava.eval.out_of_style import evaluate_out_of_style, write_set

    info = RESULTS["out_of_style"]
    root = tmp_path_factory.mktemp("out_of_style")
    meta = write_set(root, seed=info["seed"], per_cell=info["per_cell"])
    assert meta["sha256"] == info["eval_sha256"], "the out-of-style set changed since the card was written"
    return evaluate_out_of_style(pipe, root, batch_size=50)


@pytest.mark.slow
def test_card_out_of_style_numbers_match_a_fresh_evaluation(out_of_style):
    """The card's figures on pictures drawn another way, per category and wording, hold for the shipped weights."""
    card = (DEFAULT_MODEL / "README.md").read_text()
    assert "## Pictures drawn another way" in card
    for part in ("all", "train", "heldout", "blank", "after_crop"):
        for category, acc in RESULTS["out_of_style"][part]["accuracy"].items():
            assert abs(out_of_style[part]["accuracy"][category] - acc) <= TOLERANCE, (part, category)
            if part == "all":
                assert f"| {category} | " in card and f"{acc:.1f}" in card
    assert out_of_style["after_crop"]["share"] == RESULTS["out_of_style"]["after_crop"]["share"]
    # the grounding check: blank images sit near chance there too
    chance = RESULTS["out_of_style"]["chance"]
    for category, acc in RESULTS["out_of_style"]["blank"]["accuracy"].items():
        assert acc <= chance[category] + 10, (category, acc)


def test_readme_first_command_answers_its_question():
    """The quick start's `llava run ...` (as bash runs it) answers the example's question correctly."""
    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines() if "&& llava run " in ln)
    command = line[line.index("llava run "):].replace("llava run ", "", 1)
    script = f"{sys.executable} -c 'import sys; from llava.cli import main; sys.exit(main())' run {command}"
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(json.loads(ln) for ln in (ROOT / "examples" / "synth_questions.jsonl").read_text().splitlines()
               if "circles.png" in ln)
    assert row["text"] in command.replace("\\n", "\n")
    assert normalize_answer(out.stdout.strip().splitlines()[-1], "count") == row["answer"]
