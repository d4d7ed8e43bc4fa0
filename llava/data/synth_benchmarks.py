"""The synthetic world as the real benchmarks: each benchmark's own files, plus a suite to run them all.

    from llava.data.synth_benchmarks import write_benchmarks
    meta = write_benchmarks("bench", seed=0)          # or: llava data synth-bench --out bench --seed 0
    # then: llava eval run --suite bench/tiny.toml --model PATH

Every benchmark is written in its native format, so the project's answerer (`model_vqa_loader`,
`model_vqa`, `model_vqa_science`, `model_vqa_mmbench`) and its scorer (`llava eval score ...`) run
on it unchanged, and a model trained on the synthetic world gets meaningful numbers from the real
pipeline. `out_dir` gets:

    tiny.toml                        the suite (format: the contract in llava.eval.suite)
    synth_benchmarks.json            seed, sizes and question counts (marks the folder as ours)
    pope/         llava_pope_test.jsonl, annotations/coco_pope_{adversarial,popular,random}.json, images/
    scienceqa/    problems.json, pid_splits.json, llava_test_CQM-A.json, images/test/{pid}/image.png
    vqav2/        llava_vqav2_mscoco_test-dev2015.jsonl, llava_vqav2_mscoco_test2015.jsonl,
                  v2_OpenEnded_mscoco_test-dev2015_questions.json, v2_mscoco_test-dev2015_annotations.json,
                  test2015/
    mme/          llava_mme.jsonl, MME_Benchmark_release_version/{subtask}/...
    mmbench/      mmbench_dev_synth.tsv (base64 images inside)
    seed/         SEED-Bench.json, llava-seed-bench.jsonl, SEED-Bench-image/
    gqa/          llava_gqa_testdev_balanced.jsonl, testdev_balanced_questions.json, images/
    llava_bench/  questions.jsonl, context.jsonl, answers_gpt4.jsonl, images/
    mm_vet/       llava-mm-vet.jsonl, mm-vet.json, images/

The formats are written by `synth_bench_short` (POPE, VQAv2, GQA, and the helpers all share),
`synth_bench_mme` and `synth_bench_choice` (ScienceQA, MMBench, SEED, LLaVA-Bench, MM-Vet).
Questions are the world's canonical ones with LLaVA's suffixes (short answer for the loader
benchmarks, the letter instruction for the lettered ones, none for the judged ones). Answers are
balanced over each category's vocabulary, as in the synthetic eval set. POPE's negatives: adversarial
names a shape that is in the image (in another colour), popular a colour that is in it, random any
absent pair. VQAv2's ten answers mix spellings ("2"/"two") and phrasings ("a red circle" for
"red"), so only canonical answers get full credit. MME needs all 14 subtasks
(its scorer reads a file for each), so those without a counterpart in this world ask the nearest
thing: posters = the whole-image caption, celebrity = an object's shape, scene = the background,
landmark = where the word is, artwork = an object's size, commonsense_reasoning = how many sides
the shape has, numerical_calculation = objects + m, text_translation = the word in French,
code_reasoning = `len()` of the word.

Output is a pure function of (seed, n_per_benchmark, image_size) and the Pillow version: every
item has its own `random.Random` seeded from (seed, benchmark, item), apart from the training and
eval streams of `llava.data.synth`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import PIL

from llava.data.synth import DEFAULT_IMAGE_SIZE
from llava.data.synth_bench_choice import (
    write_llava_bench,
    write_mm_vet,
    write_mmbench,
    write_scienceqa,
    write_seed,
)
from llava.data.synth_bench_mme import write_mme
from llava.data.synth_bench_short import (
    Bench,
    write_gqa,
    write_pope,
    write_vqav2,
)
from llava.errors import InputError

__all__ = ["write_benchmarks", "suite_toml", "BENCHMARKS", "SUITE", "DEFAULT_N", "META_FILE", "SUITE_FILE"]

DEFAULT_N = 40
META_FILE = "synth_benchmarks.json"
SUITE_FILE = "tiny.toml"
BENCHMARKS: dict[str, Callable[[Bench], int]] = {
    "pope": write_pope, "scienceqa": write_scienceqa, "vqav2": write_vqav2, "mme": write_mme,
    "mmbench": write_mmbench, "seed": write_seed, "gqa": write_gqa, "llava_bench": write_llava_bench,
    "mm_vet": write_mm_vet,
}
JUDGED = ("llava_bench", "mm_vet")
MME_DATA = "{suite}/mme/MME_Benchmark_release_version"

# Each benchmark's suite entry: how LLaVA's scripts/v1_5/eval/*.sh answer and score it, in the
# suite file's terms (question files relative to the suite; score flags are the scorer's own).
SUITE: dict[str, dict[str, Any]] = {
    "pope": {"scorer": "pope", "answerer": "loader", "question_file": "pope/llava_pope_test.jsonl",
             "image_folder": "pope/images",
             "score": {"annotation_dir": "{suite}/pope/annotations",
                       "question_file": "{suite}/pope/llava_pope_test.jsonl", "result_file": "{answers}"}},
    "scienceqa": {"scorer": "science_qa", "answerer": "science", "question_file": "scienceqa/llava_test_CQM-A.json",
                  "image_folder": "scienceqa/images/test", "answer_args": {"single_pred_prompt": True},
                  "score": {"base_dir": "{suite}/scienceqa", "result_file": "{answers}",
                            "output_file": "{out}/output.json", "output_result": "{out}/result.json", "split": "test"}},
    "vqav2": {"scorer": "vqav2", "answerer": "loader", "question_file": "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
              "image_folder": "vqav2/test2015",
              "score": {"src": "{answers}", "test_split": "{suite}/vqav2/llava_vqav2_mscoco_test2015.jsonl",
                        "dst": "{out}/answers_upload/{experiment}.json",
                        "annotation_file": "{suite}/vqav2/v2_mscoco_test-dev2015_annotations.json"}},
    "mme": {"scorer": "mme", "answerer": "loader", "question_file": "mme/llava_mme.jsonl",
            "image_folder": "mme/MME_Benchmark_release_version",
            "score": {"experiment": "{experiment}", "answers_dir": "{answers_dir}", "data_path": MME_DATA,
                      "output_dir": "{out}/eval_tool/answers"}},
    "mmbench": {"scorer": "mmbench", "answerer": "mmbench", "question_file": "mmbench/mmbench_dev_synth.tsv",
                "answer_args": {"single_pred_prompt": True, "all_rounds": True},
                "score": {"annotation_file": "{suite}/mmbench/mmbench_dev_synth.tsv", "result_dir": "{answers_dir}",
                          "upload_dir": "{out}/answers_upload", "experiment": "{experiment}"}},
    "seed": {"scorer": "seed", "answerer": "loader", "question_file": "seed/llava-seed-bench.jsonl",
             "image_folder": "seed",
             "score": {"annotation_file": "{suite}/seed/SEED-Bench.json", "result_file": "{answers}",
                       "result_upload_file": "{out}/upload.jsonl"}},
    "gqa": {"scorer": "gqa", "answerer": "loader", "question_file": "gqa/llava_gqa_testdev_balanced.jsonl",
            "image_folder": "gqa/images",
            "score": {"tier": "testdev_balanced", "questions": "{suite}/gqa/testdev_balanced_questions.json",
                      "src": "{answers}"}},
    "llava_bench": {"scorer": "llava_bench", "answerer": "vqa", "question_file": "llava_bench/questions.jsonl",
                    "image_folder": "llava_bench/images", "max_new_tokens": 128,
                    "score": {"question": "{suite}/llava_bench/questions.jsonl",
                              "context": "{suite}/llava_bench/context.jsonl",
                              "answer_list": ["{suite}/llava_bench/answers_gpt4.jsonl", "{answers}"],
                              "output": "{out}/review.jsonl", "judge_url": "{judge_url}",
                              "judge_model": "{judge_model}"}},
    "mm_vet": {"scorer": "mm_vet", "answerer": "vqa", "question_file": "mm_vet/llava-mm-vet.jsonl",
               "image_folder": "mm_vet/images", "max_new_tokens": 128,
               "score": {"question_file": "{suite}/mm_vet/mm-vet.json", "result_file": "{answers}",
                         "output": "{out}/grades.jsonl", "judge_url": "{judge_url}", "judge_model": "{judge_model}"}},
}
# conv_mode is left out: the model's own template (LLaVA's scripts pass vicuna_v1, the tiny model's own).
DEFAULTS = {"temperature": 0, "max_new_tokens": 16, "batch_size": 16}


# -- the suite file -----------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    """A TOML value; strings as JSON strings, which are valid TOML basic strings (ASCII, escaped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def suite_toml(names: Sequence[str], seed: int, n_per_benchmark: int, image_size: int) -> str:
    """The `tiny` suite over the written benchmarks (no TOML writer is a dependency: the format is small)."""
    lines = [f"# Synthetic benchmarks in the real ones' formats: llava data synth-bench --seed {seed} "
             f"--n {n_per_benchmark} --image-size {image_size}",
             "# Run: llava eval run --suite tiny.toml --model PATH [--judge-url URL --judge-model NAME]",
             'name = "tiny"', "", "[defaults]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in DEFAULTS.items()]
    lines.append("# conv_mode left out: each model's own template")
    for name in names:
        entry = SUITE[name]
        lines += ["", "[[benchmarks]]"]
        if name in JUDGED:
            lines.append("# judged: scored only with --judge-url and --judge-model")
        lines.append(f"name = {_toml_value(name)}")
        lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items() if k != "score"]
        lines += ["", "[benchmarks.score]"] + [f"{k} = {_toml_value(v)}" for k, v in entry["score"].items()]
    return "\n".join(lines) + "\n"


# -- writing ------------------------------------------------------------------------------------------


def _clear(root: Path, names: Sequence[str]) -> None:
    """Remove the benchmark folders of an earlier run (stale files would be read by the scorers), but
    never a folder this module did not write: real benchmarks may live under the same names."""
    existing = [root / name for name in names if (root / name).exists() and any((root / name).iterdir())]
    if existing and not (root / META_FILE).is_file():
        raise InputError(f"{existing[0]} exists and was not written by `llava data synth-bench` "
                         f"(no {META_FILE} in {root}); choose an empty --out folder")
    for folder in existing:
        shutil.rmtree(folder)


def write_benchmarks(out_dir: str | os.PathLike, seed: int = 0, n_per_benchmark: int = DEFAULT_N,
                     image_size: int = DEFAULT_IMAGE_SIZE, benchmarks: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the benchmarks (see the module docstring) and `tiny.toml`; returns `synth_benchmarks.json`'s contents.

    `n_per_benchmark`: about this many questions each (each format rounds to its own structure:
    POPE asks in image pairs per category, MME has >= one image per its 14 subtasks, LLaVA-Bench
    asks three questions per image); `benchmarks`: a subset of `BENCHMARKS` (default all).
    """
    names = list(BENCHMARKS) if benchmarks is None else list(dict.fromkeys(benchmarks))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise InputError(f"unknown benchmark(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(BENCHMARKS)}")
    if n_per_benchmark < 1:
        raise InputError(f"n_per_benchmark must be >= 1; got {n_per_benchmark}")
    if image_size < 48:
        raise InputError(f"image_size {image_size} is too small for five shapes and a word; use >= 48")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _clear(root, names)
    questions = {name: BENCHMARKS[name](Bench(name, root / name, seed, n_per_benchmark, image_size)) for name in names}
    (root / SUITE_FILE).write_text(suite_toml(names, seed, n_per_benchmark, image_size), encoding="utf-8")
    meta = {"format": "llava-synth-benchmarks", "version": 1, "seed": seed, "n_per_benchmark": n_per_benchmark,
            "image_size": image_size, "pillow": PIL.__version__, "questions": questions, "suite": SUITE_FILE}
    (root / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
