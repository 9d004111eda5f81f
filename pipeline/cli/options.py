"""Shared argument and option types (Annotated aliases), so every command spells them alike, and
the one rule that picks the storage root.

Every option shows its default in its help page: options whose default is computed (``None`` in
the signature) say what it is through ``show_default="..."``, because a "[default: ...]" written
into the help text itself is eaten by rich's markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

STORAGE_ENV = "MODELBUILD_STORAGE"

RecipeArg = Annotated[Path, typer.Argument(help="Recipe file (YAML).", show_default=False, metavar="RECIPE")]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", envvar="MODELBUILD_CACHE", help="Stage cache folder.",
                 show_default="${XDG_CACHE_HOME:-~/.cache}/modelbuild"),
]
# One --storage for every command: the flag, else $MODELBUILD_STORAGE (typer reads it), else, for
# commands given a recipe, its publish.root, else ./artifacts. A run that publishes without
# --storage and a `list` without it therefore name the same store.
StorageOpt = Annotated[
    str | None,
    typer.Option("--storage", envvar=STORAGE_ENV,
                 help="Storage root: a folder or s3://BUCKET/PREFIX (S3 endpoint and credentials from the AWS "
                      "variables).",
                 show_default="a recipe's publish.root, else ./artifacts"),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (a GPU when present), cpu or cuda.", case_sensitive=False)
]


def default_storage() -> str:
    """``./artifacts`` (absolute), as ``run`` resolves it (:func:`~pipeline.storage.location.default_root`)."""
    from pipeline.storage.location import default_root

    return default_root()


def storage_url(storage: str | None) -> str:
    """The store a command without a recipe reads: ``--storage``/``$MODELBUILD_STORAGE`` as typer
    passed it, else ``./artifacts``."""
    return storage if storage is not None else default_storage()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
