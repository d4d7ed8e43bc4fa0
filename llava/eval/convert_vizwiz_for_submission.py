"""`python -m llava.eval.convert_vizwiz_for_submission`: the original's VizWiz upload converter
(upstream `scripts/convert_vizwiz_for_submission.py`).

The conversion lives in `llava.eval.scoring.vizwiz` (also `llava eval score vizwiz`).
"""

from __future__ import annotations

from llava.console import exit_with
from llava.eval.scoring.vizwiz import main

if __name__ == "__main__":
    exit_with(main())
