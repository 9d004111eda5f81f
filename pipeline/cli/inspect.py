"""``verify``: re-hash a published variant (a folder, or a reference in a store) against its manifest
(registered with the store commands, in ``registry``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.options import JsonOpt, StorageOpt, storage_url


def verify(
    target: Annotated[str, typer.Argument(help="A version folder (or its manifest.json), or MODEL/VARIANT or "
                                               "MODEL/VARIANT@VERSION in --storage.", show_default=False,
                                          metavar="REF|PATH")],
    storage: StorageOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Re-hash every file of a published variant and report each mismatch with its manifest."""
    from pipeline.errors import IntegrityError
    from pipeline.storage.manifest import verify_folder

    if Path(target).exists():
        problems, where = verify_folder(Path(target)), target
    else:
        from pipeline.storage.consume import verify as verify_version
        from pipeline.storage.location import open_storage
        from pipeline.storage.refs import parse_ref

        _version, where, problems = verify_version(open_storage(storage_url(storage)), parse_ref(target))
    if json_:
        typer.echo(json.dumps({"target": where, "ok": not problems, "problems": problems}, indent=2))
    if problems:
        for line in problems:
            typer.echo(f"mismatch: {line}", err=True)
        raise IntegrityError(f"{len(problems)} mismatch(es) in {where}", fix="republish it or restore the files")
    if not json_:
        typer.echo(f"ok: {where}: every file matches its manifest")
