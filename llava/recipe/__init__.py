"""The tiny-LLaVA recipe: the whole LLaVA pipeline (stage 0 pretraining, stage 1 alignment,
stage 2 instruction tuning, evaluation) at miniature scale on the synthetic dataset, on a CPU.

    from llava.recipe import run_recipe
    run_recipe("runs/tiny", seed=0, size="small")     # or: llava recipe tiny --out runs/tiny
"""

from llava._lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {"SIZES": "llava.recipe.sizes", "RecipeSize": "llava.recipe.sizes",
                                      "run_recipe": "llava.recipe.tiny"})

__all__ = ["run_recipe", "SIZES", "RecipeSize"]
