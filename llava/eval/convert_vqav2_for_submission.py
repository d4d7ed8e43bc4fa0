"""`python -m llava.eval.convert_vqav2_for_submission`: the original's VQAv2 submission converter
(upstream `scripts/convert_vqav2_for_submission.py`).

The conversion lives in `llava.eval.scoring.vqav2` (also `llava eval score vqav2`).
"""

from __future__ import annotations

from llava.console import exit_with
from llava.eval.scoring.vqav2 import main

if __name__ == "__main__":
    exit_with(main())
