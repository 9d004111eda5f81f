"""The interface every storage backend implements (one backend per module: ``local``, ``s3``).

A store holds immutable versions ``<model>/<variant>/<version>/`` (a manifest plus the files it
lists), per-variant channel pointers ``<model>/<variant>/channels/<name>.json`` and the registry
index ``index.json`` at the root. Paths given to a backend are POSIX paths relative to its root,
already checked by :mod:`pipeline.storage.refs` (no ``..``, no absolute paths).

Two operations carry the safety guarantees and differ per backend:

- :meth:`Storage.publish_tree` makes a version visible all at once or not at all (a folder
  rename on a filesystem; on S3, where nothing renames, the manifest is uploaded last and a
  version without one does not exist for readers).
- :meth:`Storage.read_versioned` / :meth:`Storage.write_if` are compare-and-swap on one small
  object, so concurrent publishers that all add to the index lose nothing (an exclusive lock on
  a filesystem, conditional writes — ``If-Match``/``If-None-Match`` — on S3).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

Records = list[dict[str, Any]]


def check_expected(record: dict[str, Any], expected: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """``record`` (what was written) if it agrees with the cache's record of the same path."""
    want = (expected or {}).get(record["path"])
    if want is not None and (want["size"], want["sha256"]) != (record["size"], record["sha256"]):
        from pipeline.errors import IntegrityError

        raise IntegrityError(f"{record['path']} changed in the stage cache after it was checked "
                             f"(sha256 {record['sha256'][:12]}…, cache says {want['sha256'][:12]}…)",
                             where="publish", fix="nothing was published; rerun to rebuild the cache entry")
    return record


class Storage(ABC):
    """A storage root. ``url`` is what users see (never credentials)."""

    url: str

    @abstractmethod
    def check_writable(self) -> None:
        """Fail before any work when nothing could be published here (StorageError)."""

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The object's bytes; FileNotFoundError when it does not exist."""

    @abstractmethod
    def read_versioned(self, rel: str) -> tuple[bytes | None, Any]:
        """``(bytes or None when missing, token)`` for a later :meth:`write_if`."""

    @abstractmethod
    def write_if(self, rel: str, data: bytes, token: Any) -> bool:
        """Replace the object only if it is unchanged since :meth:`read_versioned` returned
        ``token`` (or still missing, if it was). False when another writer got there first."""

    @abstractmethod
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace the object atomically (readers see the old or the new bytes, never a mix)."""

    @abstractmethod
    def list_dir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (folders and objects); empty when there is none."""

    @abstractmethod
    def list_files(self, rel: str) -> list[tuple[str, int]]:
        """``(path relative to rel, size)`` of every object under ``rel``."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def publish_tree(self, source: Path, rel: str, extra: dict[str, bytes], make_manifest: Callable[[Records], bytes],
                     *, expected: dict[str, dict[str, Any]] | None = None) -> bool:
        """Make ``rel`` a complete version: ``source``'s files, ``extra`` (relative path → bytes;
        it replaces a source file of the same name) and, last, ``manifest.json`` =
        ``make_manifest(records of every file)``. On failure nothing of it stays visible.

        Every record is the size and sha256 of the bytes this call wrote (or uploaded), never a
        record taken from elsewhere. ``expected`` (path → ``{path, size, sha256}``) are the
        stage cache's records of ``source``: a file whose written bytes differ from them is an
        IntegrityError (the cache entry changed after it was checked), nothing is published.

        Returns True when this call made the version, False when a complete version already
        stood at ``rel`` (a concurrent publisher of the same build won; its files are kept)."""

    @abstractmethod
    def download(self, rel: str, target: Path) -> str | None:
        """Copy one object to a local file (the caller verifies and renames it); returns its
        sha256 when computed on the way, else None."""

    @abstractmethod
    def delete_tree(self, rel: str) -> None:
        """Remove everything under ``rel`` (missing is fine)."""

    @abstractmethod
    def incomplete_versions(self, rel: str) -> list[str]:
        """Leftovers of interrupted publishes under a variant folder (names to delete)."""

    @abstractmethod
    def modified(self, rel: str) -> float | None:
        """When anything under ``rel`` last changed (epoch seconds; None when nothing is there)."""

    def unfinished_uploads(self, rel: str) -> list[tuple[str, str, float]]:
        """Uploads under ``rel`` that were started and never completed, as ``(path, upload id,
        start time)``: invisible leftovers of a killed publisher that still cost storage. A
        filesystem has none (a killed copy leaves files, found by ``incomplete_versions``)."""
        return []

    def abort_upload(self, rel: str, upload_id: str) -> None:
        """Discard an unfinished upload found by ``unfinished_uploads``. Only a store that reports
        some (S3) is ever asked; one that reports none has nothing to abort."""
        raise NotImplementedError(f"{type(self).__name__} reports no unfinished uploads to abort")

    def location(self, rel: str) -> str:
        """Where ``rel`` lives, as a user or a serving engine would spell it."""
        return f"{self.url.rstrip('/')}/{rel}"

    def local_path(self, rel: str) -> Path | None:
        """The local path of ``rel`` when the store is a filesystem, else None."""
        return None
