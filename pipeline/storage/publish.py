"""Publishing a finished variant: an immutable version, its registry entry, the ``latest`` channel.

Layout: ``<root>/<model>/<variant>/<version>/`` where ``version`` is the UTC time plus the first
12 hex digits of the build key. The version appears whole or not at all (see
:meth:`Storage.publish_tree`); then the index gets its entry and ``latest`` moves to it, both by
compare-and-swap. A build key that is already published is not published again, but its index
entry and channel are made sure of, so a publisher killed between the steps is completed by a
rerun. The version name of a build key is claimed once (``<model>/<variant>/.claims/<key>.json``),
so concurrent publishers of one build all land on one version.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.storage.base import Storage
from pipeline.storage.location import check_name
from pipeline.storage.manifest import parse_manifest
from pipeline.storage.registry import (
    CLAIMS,
    MANIFEST,
    add_entry,
    entry_from_manifest,
    is_version_name,
    move_channel,
    read_channel,
    update,
    versions,
)


def find_published(storage: Storage, model: str, variant: str, build_key: str) -> tuple[str, bytes] | None:
    """``(version, manifest bytes)`` of the version built from ``build_key``, if any."""
    claimed = _claimed_version(storage, model, variant, build_key)
    candidates = versions(storage, model, variant)
    if claimed in candidates:  # the usual case: one read instead of every manifest
        candidates = [claimed] + [v for v in candidates if v != claimed]
    for version in candidates:
        try:
            raw = storage.read_bytes(f"{model}/{variant}/{version}/{MANIFEST}")
            if json.loads(raw).get("build_key") == build_key:
                return version, raw
        except (FileNotFoundError, ValueError, AttributeError):
            continue
    return None


def claim_rel(model: str, variant: str, build_key: str) -> str:
    return f"{model}/{variant}/{CLAIMS}/{build_key}.json"


def _claimed_version(storage: Storage, model: str, variant: str, build_key: str) -> str | None:
    try:
        version = json.loads(storage.read_bytes(claim_rel(model, variant, build_key))).get("version")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def _claim(storage: Storage, model: str, variant: str, build_key: str) -> str:
    """The version name for ``build_key``: the first publisher to claim it names it (by
    compare-and-swap), every other one, concurrent or later, publishes to that same name. So N
    runs of one recipe make one version, and a publisher killed mid-way is completed in place."""
    fresh = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{build_key[:12]}"

    def change(current: Any) -> Any:
        if isinstance(current, dict) and isinstance(current.get("version"), str) and is_version_name(current["version"]):
            return current
        return {"build_key": build_key, "version": fresh}

    return update(storage, claim_rel(model, variant, build_key), change, dict)["version"]


def publish_variant(
    storage: Storage, *, model: str, variant: str, build_key: str, files_from: Path, manifest: dict[str, Any],
    extra_files: dict[str, str] | Callable[[dict[str, Any]], dict[str, str]] | None = None,
    expected: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Publish ``files_from`` (and ``extra_files``: relative path -> text, e.g. serving profiles and
    the model card, or a function of the final manifest returning them; an extra file replaces a
    source file of the same name) as a new version with ``manifest``; register it and point
    ``latest`` at it.

    ``expected`` are the files' records from the stage cache: published bytes must equal them
    (see :meth:`Storage.publish_tree`).

    Returns:
        ``{status, path, version}``; status is ``published`` or ``already published`` (this
        build's version was there, or a concurrent publisher of it finished first).
    """
    check_name(model, "model")
    check_name(variant, "variant")
    existing = find_published(storage, model, variant, build_key)
    if existing is None:
        version = _claim(storage, model, variant, build_key)
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

        def make_manifest(records: list[dict[str, Any]]) -> bytes:
            return json.dumps({**base, "files": records}, indent=2, sort_keys=True).encode("utf-8")

        made = storage.publish_tree(Path(files_from), rel, extra, make_manifest,
                                    expected={r["path"]: r for r in expected or []})
        existing = (version, storage.read_bytes(f"{rel}/{MANIFEST}"))
        status = "published" if made else "already published"
    else:
        status = "already published"
    version, raw = existing
    add_entry(storage, entry_from_manifest(parse_manifest(raw, f"{model}/{variant}@{version}"), raw))
    # Only `latest` is read: a malformed other channel is not this publish's business.
    if status == "published" or read_channel(storage, model, variant, "latest") is None:
        move_channel(storage, model, variant, "latest", version)
    return {"status": status, "path": storage.location(f"{model}/{variant}/{version}"), "version": version}
