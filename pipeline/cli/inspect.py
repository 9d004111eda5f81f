"""``verify``: re-hash a published variant against its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command()(verify)


def verify(
    path: Annotated[Path, typer.Argument(help="A published version folder (or its manifest.json).", show_default=False)],
) -> None:
    """Re-hash every file of a published variant and report each mismatch with its manifest."""
    from pipeline.errors import IntegrityError
    from pipeline.storage.manifest import verify_folder

    problems = verify_folder(path)
    if problems:
        for line in problems:
            typer.echo(f"mismatch: {line}", err=True)
        raise IntegrityError(f"{len(problems)} mismatch(es) in {path}", fix="republish it or restore the files")
    typer.echo(f"ok: {path}: every file matches its manifest")
