"""`python -m llava.eval.eval_gpt_review_bench`, the original's entry point; see `llava.eval.scoring.llava_bench`."""

from __future__ import annotations

from llava.console import exit_with


def main() -> None:
    from llava.eval.scoring.llava_bench import main as score_main

    exit_with(score_main())


if __name__ == "__main__":
    main()
