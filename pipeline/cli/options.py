"""Shared argument and option types (Annotated aliases), so every command spells them alike."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RecipeArg = Annotated[Path, typer.Argument(help="Recipe file (YAML).", show_default=False, metavar="RECIPE")]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", envvar="MODELBUILD_CACHE", help="Stage cache folder [default: ~/.cache/modelbuild]."),
]
StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", help="Storage root to publish to: a folder or s3://BUCKET/PREFIX "
                                   "[default: recipe's publish.root, else ./artifacts]."),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (a GPU when present), cpu or cuda.", case_sensitive=False)
]
