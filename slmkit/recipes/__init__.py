"""Recipes: orchestration that calls the stages in order — the quickstart and the spectrum comparison.

>>> from slmkit.recipes import quickstart, run_recipe
"""

from slmkit.recipes.quickstart import quickstart
from slmkit.recipes.spectrum import run_recipe

__all__ = ["quickstart", "run_recipe"]
