"""``verify``: re-hash a published variant (a folder, or a reference in a store) against its manifest."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.registry import JsonOpt, StoreOpt


def register(app: typer.Typer) -> None:
    app.command()(verify)


def verify(
    target: Annotated[str, typer.Argument(help="A version folder (or its manifest.json), or MODEL/VARIANT[@VERSION] "
                                               "in --storage.", show_default=False, metavar="REF|PATH")],
    storage: StoreOpt = "artifacts",
    json_: JsonOpt = False,
) -> None:
    """Re-hash every file of a published variant and report each mismatch with its manifest."""
    from pipeline.errors import IntegrityError
    from pipeline.storage.manifest import verify_folder

    if Path(target).exists():
        problems, where = verify_folder(Path(target)), target
    else:
        from pipeline.storage.consume import pull
        from pipeline.storage.location import open_storage
        from pipeline.storage.refs import parse_ref
        from pipeline.storage.registry import resolve

        store, ref = open_storage(storage), parse_ref(target)
        version, _manifest, _raw = resolve(store, ref)
        where = store.location(f"{ref.model}/{ref.variant}/{version}")
        local = store.local_path(f"{ref.model}/{ref.variant}/{version}")
        if local is not None:
            problems = verify_folder(local)
        else:  # a remote store: stream every file through a checked pull into a scratch folder
            scratch = Path(tempfile.mkdtemp(prefix="modelbuild-verify-"))
            try:
                pull(store, ref.__class__(ref.model, ref.variant, version), scratch / "v")
                problems = []
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    if json_:
        typer.echo(json.dumps({"target": where, "ok": not problems, "problems": problems}, indent=2))
    if problems:
        for line in problems:
            typer.echo(f"mismatch: {line}", err=True)
        raise IntegrityError(f"{len(problems)} mismatch(es) in {where}", fix="republish it or restore the files")
    if not json_:
        typer.echo(f"ok: {where}: every file matches its manifest")
