"""Reading and checking the manifest beside every published variant (``manifest.json``): that it
is modelbuild's, names each file once inside its folder, and that the files match it.

What goes into one is built by ``pipeline.publishing.manifest``.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.errors import IntegrityError
from pipeline.files import MANIFEST
from pipeline.hashing import parallel_map, sha256_file


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A manifest's bytes as modelbuild wrote them, or an IntegrityError naming ``where``.

    A manifest is data from a store anyone may have written to: its file list must be records
    of ``{path, size, sha256}`` whose paths stay inside the version folder, each listed once.
    """
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    problem = _manifest_problem(manifest)
    if problem:
        raise IntegrityError(f"manifest of {where} {problem}", fix="the store was changed by hand: republish the variant")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, list):
        return "has no list of files"
    seen = set()
    for f in files:
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
                and isinstance(f.get("sha256"), str)):
            return f"lists a malformed file record {str(f)[:80]!r}"
        path = PurePosixPath(f["path"])
        if (not path.parts or path.is_absolute() or ".." in path.parts or "\\" in f["path"]
                or f["path"] == MANIFEST or path.as_posix() != f["path"]):
            return f"lists an unsafe path {f['path']!r}"
        if f["path"] in seen:
            return f"lists {f['path']!r} twice"
        seen.add(f["path"])
    return None


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse and check ``folder/manifest.json`` (see :func:`parse_manifest`).

    Raises:
        IntegrityError: missing, unreadable or malformed manifest.
    """
    path = folder / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"no {MANIFEST} in {folder}", fix="give a published version folder") from None
    except OSError as e:
        raise IntegrityError(f"unreadable manifest {path}: {e.strerror or e}") from None
    return parse_manifest(raw, str(folder))


def verify_folder(folder: Path) -> list[str]:
    """Re-hash a published folder against its manifest.

    Returns:
        One line per mismatch (missing, changed size, changed content, unexpected file); empty
        when everything matches.

    Raises:
        IntegrityError: no usable manifest (see :func:`read_manifest`).
    """
    folder = Path(folder)
    if folder.name == MANIFEST:
        folder = folder.parent
    return file_problems(folder, read_manifest(folder))


def file_problems(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Every difference between ``folder``'s files and a checked manifest's records."""

    def check(f: dict[str, Any]) -> str | None:
        path = folder / f["path"]
        if path.is_symlink() or not path.is_file():
            return f"missing: {f['path']}"
        size = path.stat().st_size
        if size != f["size"]:
            return f"size differs: {f['path']} ({size} bytes, manifest says {f['size']})"
        if sha256_file(path) != f["sha256"]:
            return f"content differs: {f['path']} (sha256 mismatch)"
        return None

    problems = [p for p in parallel_map(check, manifest["files"]) if p is not None]
    listed = {f["path"] for f in manifest["files"]}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if (path.is_file() or path.is_symlink()) and rel != MANIFEST and rel not in listed:
            problems.append(f"not in manifest: {rel}")
    return problems
