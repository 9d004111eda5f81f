"""Publishing a finished variant: an immutable version, its registry entry, the ``latest`` channel.

Layout: ``<root>/<model>/<variant>/<version>/`` where ``version`` is the UTC time plus the first
12 hex digits of the build key. The version appears whole or not at all (see
:meth:`Storage.publish_tree`); then the index gets its entry and ``latest`` moves to it, both by
compare-and-swap. A build key that is already published is not published again, but its index
entry and channel are made sure of, so a publisher killed between the steps is completed by a
rerun.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.storage.base import Storage
from pipeline.storage.location import check_name
from pipeline.storage.registry import MANIFEST, add_entry, channels, entry_from_manifest, move_channel, versions


def find_published(storage: Storage, model: str, variant: str, build_key: str) -> tuple[str, bytes] | None:
    """``(version, manifest bytes)`` of the version built from ``build_key``, if any."""
    for version in versions(storage, model, variant):
        try:
            raw = storage.read_bytes(f"{model}/{variant}/{version}/{MANIFEST}")
            if json.loads(raw).get("build_key") == build_key:
                return version, raw
        except (FileNotFoundError, ValueError):
            continue
    return None


def publish_variant(
    storage: Storage, *, model: str, variant: str, build_key: str, files_from: Path, manifest: dict[str, Any],
    extra_files: dict[str, str] | Callable[[dict[str, Any]], dict[str, str]] | None = None, link: bool = True, known: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Publish ``files_from`` (and ``extra_files``: relative path -> text, e.g. serving profiles and
    the model card, or a function of the final manifest returning them; an extra file replaces a
    source file of the same name) as a new version with ``manifest``; register it and point
    ``latest`` at it.

    ``known`` are the files' records from the stage cache (see :meth:`Storage.publish_tree`).

    Returns:
        ``{status, path, version}``; status is ``published`` or ``already published``.
    """
    check_name(model, "model")
    check_name(variant, "variant")
    existing = find_published(storage, model, variant, build_key)
    if existing is not None:
        version, raw = existing
        status = "already published"
    else:
        version = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{build_key[:12]}"
        rel = f"{model}/{variant}/{version}"
        location = storage.location(rel)
        base = {
            **manifest,
            "model": model,
            "variant": variant,
            "build_key": build_key,
            "version": version,
            "serve": {e: cmd.format(path=location) for e, cmd in manifest["format"].get("serve", {}).items()},
        }
        if base.get("serving_profiles"):
            base["serving_profiles"] = [{**p, "command": p["command"].format(path=location)} for p in base["serving_profiles"]]
        files = extra_files(base) if callable(extra_files) else (extra_files or {})
        extra = {name: text.encode("utf-8") for name, text in files.items()}
        written: list[bytes] = []

        def make_manifest(records: list[dict[str, Any]]) -> bytes:
            written.append(json.dumps({**base, "files": records}, indent=2, sort_keys=True).encode("utf-8"))
            return written[-1]

        storage.publish_tree(Path(files_from), rel, extra, make_manifest, link=link,
                             known={r["path"]: r for r in known or []})
        raw = written[-1]
        status = "published"
    add_entry(storage, entry_from_manifest(json.loads(raw), raw))
    if status == "published" or "latest" not in channels(storage, model, variant):
        move_channel(storage, model, variant, "latest", version)
    return {"status": status, "path": storage.location(f"{model}/{variant}/{version}"), "version": version}
