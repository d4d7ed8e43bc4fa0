import sys

from llava.recipe.cli import main

sys.exit(main())
