"""A storage root on a local or NFS-mounted filesystem, through fsspec's local filesystem.

Versions are assembled in a dot-prefixed staging folder beside their final place and appear by
one ``rename``; when two publishers race to the same version, the second rename fails and the
first version stands. Compare-and-swap holds an exclusive ``flock`` on a lock file beside the object
(Linux maps it to POSIX byte-range locks on NFS, which NFSv4 servers arbitrate) and replaces the
object by rename, so an interrupted writer leaves the old object whole.

Published files are copies, never links to the stage cache: a hard link shares one inode, so a
write through the cache (or through the store) would change bytes a manifest vouches for.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StorageError
from pipeline.files import MANIFEST, atomic_write
from pipeline.hashing import copy_hashed, digest_bytes, list_tree, parallel_map
from pipeline.storage.base import Records, Storage, check_expected

STAGING = ".staging-"


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        self.fs = LocalFileSystem()

    def _path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def local_path(self, rel: str) -> Path:
        return self._path(rel)

    def location(self, rel: str) -> str:
        return str(self._path(rel))

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StorageError(
                f"storage root is not writable: {self.root} ({e.strerror or e})",
                where="publish.root",
                fix="choose another folder with --storage or publish.root, or fix its permissions",
            ) from None

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(str(self._path(rel)))

    def read_versioned(self, rel: str) -> tuple[bytes | None, Any]:
        # The token is the content itself: under the lock, "unchanged" means "same bytes".
        try:
            data = self.read_bytes(rel)
        except FileNotFoundError:
            return None, None
        return data, data

    def write_if(self, rel: str, data: bytes, token: Any) -> bool:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                current = None
            if current != token:
                return False
            atomic_write(path, data)
            return True

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)

    def list_dir(self, rel: str) -> list[str]:
        path = self._path(rel)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []

    def list_files(self, rel: str) -> list[tuple[str, int]]:
        base = self._path(rel)
        if not base.is_dir():
            return []
        return sorted((p.relative_to(base).as_posix(), p.stat().st_size) for p in base.rglob("*") if p.is_file())

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def publish_tree(self, source: Path, rel: str, extra: dict[str, bytes], make_manifest: Callable[[Records], bytes],
                     *, expected: dict[str, dict[str, Any]] | None = None) -> bool:
        final = self._path(rel)
        staging = final.with_name(f"{STAGING}{final.name}-{secrets.token_hex(4)}")

        def put(rel_path: Path) -> dict[str, Any]:
            dst, posix = staging / rel_path, rel_path.as_posix()
            dst.parent.mkdir(parents=True, exist_ok=True)
            # A copy, never a link: a link would let a later write to either name change bytes
            # this version's manifest vouches for. The digest is of the bytes written.
            size, sha = copy_hashed(source / rel_path, dst)
            return check_expected({"path": posix, "size": size, "sha256": sha}, expected)

        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            records = parallel_map(put, [r for r in list_tree(source) if r.as_posix() not in extra])
            for name, data in extra.items():
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                (staging / name).write_bytes(data)
                records.append({"path": name, "size": len(data), "sha256": digest_bytes(data)})
            atomic_write(staging / MANIFEST, make_manifest(sorted(records, key=lambda r: r["path"])))
            for path in staging.rglob("*"):
                if path.is_file():  # published bytes are not to be edited in place
                    os.chmod(path, path.stat().st_mode & ~0o222)
            try:
                os.rename(staging, final)
            except OSError as e:
                # Another publisher of the same version got there first (rename onto a folder
                # that is not empty fails): theirs stands, built from the same cache entry.
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and (final / MANIFEST).is_file():
                    return False
                raise
            return True
        except OSError as e:
            raise StorageError(f"publishing to {final.parent} failed: {e}", where="publish",
                               fix="check the storage root (space, permissions)") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def download(self, rel: str, target: Path) -> None:
        # In-kernel copy; the caller then hashes the copy (from the page cache) to check it.
        shutil.copyfile(self._path(rel), target)

    def delete_tree(self, rel: str) -> None:
        path = self._path(rel)
        if path.is_dir():
            # Published files are read-only; their folder's permissions are what rmtree needs.
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    def modified(self, rel: str) -> float | None:
        base = self._path(rel)
        try:
            return max([base.stat().st_mtime] + [p.stat().st_mtime for p in base.rglob("*")])
        except FileNotFoundError:
            return None

    def incomplete_versions(self, rel: str) -> list[str]:
        return [n for n in self.list_dir(rel) if n.startswith(STAGING)]

