"""`python -m llava.eval.model_vqa`: the original's open-ended answering (LLaVA-Bench, MM-Vet).

    python -m llava.eval.model_vqa --model-path PATH --question-file q.jsonl --image-folder imgs \\
        --answers-file answers.jsonl --temperature 0 --conv-mode vicuna_v1 [--batch-size 16]

Same flags and answer rows as the original (which hard-codes 1024 new tokens: the default here),
batched and resumable; see `llava.eval.answering`.
"""

from __future__ import annotations

from collections.abc import Sequence

from llava.console import exit_with
from llava.eval.answering import Answerer, read_question_file

ANSWERER = Answerer("python -m llava.eval.model_vqa", max_new_tokens=1024, read_items=read_question_file)


def main(argv: Sequence[str] | None = None) -> int:
    return ANSWERER.main(argv)


if __name__ == "__main__":
    exit_with(main())
