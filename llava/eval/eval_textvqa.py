"""`python -m llava.eval.eval_textvqa --annotation-file A --result-file R`: the original's entry point.

The scoring lives in `llava.eval.scoring.textvqa` (also `llava eval score textvqa`).
"""

from __future__ import annotations

from llava.console import exit_with
from llava.eval.scoring.textvqa import main

if __name__ == "__main__":
    exit_with(main())
