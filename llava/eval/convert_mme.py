"""`python -m llava.eval.convert_mme --experiment NAME`: LLaVA's `convert_answer_to_mme.py`.

Converts `answers/{NAME}.jsonl` to MME's per-subtask txt files and then prints the official MME
scores (upstream runs `eval_tool/calculation.py` as a second step); see `llava.eval.scoring.mme`.
"""

from __future__ import annotations

from llava.console import exit_with


def main() -> None:
    from llava.eval.scoring.mme import main as score_main

    exit_with(score_main(prog="python -m llava.eval.convert_mme"))


if __name__ == "__main__":
    main()
