"""Atomic publishing into a storage root on a local or network filesystem.

Layout: ``<root>/<model>/<variant>/<version>/`` where ``version`` is the UTC time plus the first
12 hex digits of the build key. A version is assembled in a dot-prefixed staging folder beside
it and appears by one rename, manifest included, so a reader never sees half of it. A build key
that is already published is not published again.

Files come from the stage cache, whose entries are immutable. When the storage root is on the
same filesystem, a published file is a hard link to the cached one (made read-only) instead of
a second copy, as DVC's cache links do: a demo build otherwise holds every variant twice on disk.
``link=False`` asks for independent copies.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.errors import StorageError
from pipeline.hashing import file_records
from pipeline.storage.manifest import MANIFEST


def check_writable(root: Path) -> None:
    """Fail before any work when the storage root cannot take a publish.

    Raises:
        StorageError: naming the root and the OS's reason.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StorageError(
            f"storage root is not writable: {root} ({e.strerror or e})",
            where="publish.root",
            fix="choose another folder with --storage or publish.root, or fix its permissions",
        ) from None


def versions(root: Path, model: str, variant: str) -> list[Path]:
    """Published (complete) version folders, oldest first; staging folders are never listed."""
    folder = Path(root) / model / variant
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())


def find_published(root: Path, model: str, variant: str, build_key: str) -> Path | None:
    for version in versions(root, model, variant):
        try:
            if json.loads((version / MANIFEST).read_text(encoding="utf-8")).get("build_key") == build_key:
                return version
        except (OSError, ValueError):
            continue
    return None


def publish_variant(
    root: Path, *, model: str, variant: str, build_key: str, files_from: Path, manifest: dict[str, Any],
    extra_files: dict[str, str] | None = None, link: bool = True,
) -> dict[str, Any]:
    """Copy ``files_from`` (and ``extra_files``: relative path -> text, e.g. serving profiles)
    into a new immutable version with ``manifest``.

    Returns:
        ``{status, path, version}``; status is ``published`` or ``already published``.
    """
    existing = find_published(root, model, variant, build_key)
    if existing is not None:
        return {"status": "already published", "path": str(existing), "version": existing.name}
    version = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{build_key[:12]}"
    parent = Path(root) / model / variant
    final = parent / version
    staging = parent / f".staging-{version}-{secrets.token_hex(4)}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(files_from, staging, copy_function=_link_or_copy if link else shutil.copy2)
        for rel, text in (extra_files or {}).items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        manifest = {
            **manifest,
            "version": version,
            "files": file_records(staging),
            "serve": {e: cmd.format(path=final) for e, cmd in manifest["format"].get("serve", {}).items()},
        }
        if manifest.get("serving_profiles"):
            manifest["serving_profiles"] = [
                {**p, "command": p["command"].format(path=final)} for p in manifest["serving_profiles"]
            ]
        tmp = staging / f".{MANIFEST}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, staging / MANIFEST)
        os.rename(staging, final)
    except OSError as e:
        raise StorageError(f"publishing to {parent} failed: {e}", where="publish", fix="check the storage root") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"status": "published", "path": str(final), "version": version}


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` (read-only from then on) where the filesystem allows, else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        return
    # The link shares the cache's inode: writing through either name would change both.
    os.chmod(dst, os.stat(dst).st_mode & ~0o222)
