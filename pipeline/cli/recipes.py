"""``validate`` and ``schema``: recipe commands that never import torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.recipe import Recipe, load_recipe


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(schema)


def validate(recipes: Annotated[list[Path], typer.Argument(help="Recipe files.", show_default=False)]) -> None:
    """Check recipes against the schema; the first problem of each file is reported."""
    from pipeline.errors import RecipeError

    failed: RecipeError | None = None
    for path in recipes:
        try:
            loaded = load_recipe(path)
        except RecipeError as e:
            typer.echo(f"invalid: {e.render()}", err=True)
            failed = failed or e
            continue
        typer.echo(f"ok: {path} ({len(loaded.recipe.variants)} variant(s))")
    if failed is not None:
        raise typer.Exit(failed.exit_code)


def schema() -> None:
    """Print the recipe JSON Schema (for editors and CI linters)."""
    typer.echo(json.dumps(Recipe.model_json_schema(), indent=2))
