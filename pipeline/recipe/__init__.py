"""Recipes: the YAML a user writes, parsed into strict frozen models (no torch imported here)."""

from pipeline.recipe.gate import Gate
from pipeline.recipe.load import LoadedRecipe, load_recipe
from pipeline.recipe.schema import Recipe

__all__ = ["Gate", "LoadedRecipe", "Recipe", "load_recipe"]
