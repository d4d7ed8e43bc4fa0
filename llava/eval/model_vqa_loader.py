"""`python -m llava.eval.model_vqa_loader`: the original's short-answer benchmark answering
(VQAv2, GQA, VizWiz, TextVQA, POPE, MME, SEED-Bench).

    python -m llava.eval.model_vqa_loader --model-path PATH --question-file q.jsonl \\
        --image-folder imgs --answers-file answers.jsonl --temperature 0 --conv-mode vicuna_v1

Same flags and answer rows as the original (--max_new_tokens 128 by default); where the
original asserts batch size 1, `--batch-size N` answers N questions per engine call, and a
rerun resumes. See `llava.eval.answering`.
"""

from __future__ import annotations

from collections.abc import Sequence

from llava.console import exit_with
from llava.eval.answering import Answerer, read_question_file

ANSWERER = Answerer("python -m llava.eval.model_vqa_loader", max_new_tokens=128, read_items=read_question_file)


def main(argv: Sequence[str] | None = None) -> int:
    return ANSWERER.main(argv)


if __name__ == "__main__":
    exit_with(main())
