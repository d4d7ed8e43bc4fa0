"""`python -m llava.train --stage ... --data ... --out ...` (also what `torchrun -m llava.train` runs)."""

import sys

from llava.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
