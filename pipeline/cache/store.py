"""The content-addressed stage cache.

Layout::

    <root>/objects/<key[:2]>/<key>/data/...      the stage's output files
    <root>/objects/<key[:2]>/<key>/entry.json    what the stage returned, every file's size+sha256
    <root>/tmp/<key>.<host>.<pid>.<random>/      an entry being written

An entry is built in ``tmp/`` and becomes visible by one ``rename``: a process killed mid-stage
(SIGKILL included) leaves only a temp folder, never a half-written entry, and the next run
removes temp folders whose writer is gone. On a hit the entry's files are checked against
``entry.json``: existence and size, and a file whose mtime differs from the one recorded is
re-hashed (``deep=True`` re-hashes all); a damaged entry is deleted with a warning and the stage
runs again instead of being trusted. Publishing copies entries' files, so no write through a
store reaches the cache (a Hub fetch links the Hub cache's blobs, which huggingface_hub never
rewrites; stores published by older modelbuild versions may still hold links: the mtime check
catches a write through them).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import CacheEntryCorrupt
from pipeline.files import atomic_write
from pipeline.hashing import file_records, sha256_file, tree_digest

ENTRY_FORMAT = 1
# Dots would break the temp-folder name's fields.
_HOST = socket.gethostname().replace(".", "-") or "host"


@dataclass(frozen=True)
class Entry:
    """A finished cache entry.

    Attributes:
        key: the stage key (full sha256).
        data: folder holding the stage's output files.
        record: the parsed ``entry.json`` (``result``, ``files``, ``digest``, ...).
    """

    key: str
    data: Path
    record: dict[str, Any]

    @property
    def result(self) -> dict[str, Any]:
        return self.record["result"]

    @property
    def digest(self) -> str:
        return self.record["digest"]


class CacheStore:
    """A cache root on a local or shared filesystem.

    Args:
        root: the cache folder (created on first write).
        warn: called with a one-line message when an entry is found damaged.
    """

    def __init__(self, root: Path, warn: Callable[[str], None] = lambda _msg: None):
        self.root = Path(root)
        self.warn = warn

    def _entry_dir(self, key: str) -> Path:
        return self.root / "objects" / key[:2] / key

    def get(self, key: str, *, deep: bool = False) -> Entry | None:
        """The finished entry for ``key``, or None (also when it was damaged and removed)."""
        folder = self._entry_dir(key)
        if not folder.exists():
            return None
        try:
            return self._check(key, folder, deep)
        except CacheEntryCorrupt as e:
            self.warn(f"cache entry {key[:12]}… is damaged ({e}); removing it and rebuilding")
            shutil.rmtree(folder, ignore_errors=True)
            return None

    def _check(self, key: str, folder: Path, deep: bool) -> Entry:
        try:
            record = json.loads((folder / "entry.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CacheEntryCorrupt(f"unreadable entry.json: {e.__class__.__name__}") from None
        if not isinstance(record, dict) or not isinstance(record.get("files"), list):
            raise CacheEntryCorrupt("entry.json is not a cache record")
        if record.get("key") != key or record.get("format") != ENTRY_FORMAT:
            raise CacheEntryCorrupt("entry.json does not belong to this key")
        data = folder / "data"
        fingerprints = record.get("fingerprints") or {}
        # Entries written before fingerprints were recorded: no file of theirs was written
        # after entry.json, unless something changed it since.
        written = (folder / "entry.json").stat().st_mtime_ns
        for f in record["files"]:
            path = data / f["path"]
            try:
                st = path.stat()
            except FileNotFoundError:
                raise CacheEntryCorrupt(f"missing {f['path']}") from None
            if st.st_size != f["size"]:
                raise CacheEntryCorrupt(f"{f['path']} has {st.st_size} bytes, expected {f['size']}")
            known = fingerprints.get(f["path"])
            touched = st.st_mtime_ns != known[1] if known else st.st_mtime_ns > written
            # A cheap fingerprint first (size, mtime); only a file whose mtime moved is re-hashed,
            # so an edit in place (same size) is caught without hashing every hit.
            if (deep or touched) and sha256_file(path) != f["sha256"]:
                raise CacheEntryCorrupt(f"{f['path']} content changed")
        return Entry(key, data, record)

    def put(self, key: str, build: Callable[[Path], dict[str, Any]], describe: dict[str, Any],
            measured: Callable[[], dict[str, Any]] | None = None) -> Entry:
        """Run ``build(data_dir)`` into a temp folder and publish it atomically under ``key``.

        Args:
            key: the stage key.
            build: writes the outputs into the folder it is given; returns a JSON-able result.
            describe: stored beside the result for humans (stage id, kind, parameters).
            measured: called after ``build``: figures of the build (its peak memory) recorded in
                ``entry.json`` beside its seconds, outside its result.

        Returns:
            The finished entry (another process's, if it finished the same key first).
        """
        self.sweep()
        tmp = self.root / "tmp" / f"{key}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}"
        data = tmp / "data"
        data.mkdir(parents=True)
        try:
            started = time.time()
            result = build(data)
            files = file_records(data)
            fingerprints = {f["path"]: [f["size"], (data / f["path"]).stat().st_mtime_ns] for f in files}
            record = {
                "format": ENTRY_FORMAT,
                "key": key,
                "describe": describe,
                "result": result,
                "files": files,
                "digest": tree_digest(files),
                "fingerprints": fingerprints,
                "seconds": round(time.time() - started, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **(measured() if measured is not None else {}),
            }
            _write_json_atomic(tmp / "entry.json", record)
            final = self._entry_dir(key)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
                # Another writer finished the same key first: same key, same content; keep theirs.
                shutil.rmtree(tmp, ignore_errors=True)
            entry = self.get(key)
            if entry is None:
                raise CacheEntryCorrupt(f"entry {key[:12]}… vanished right after it was written")
            return entry
        except BaseException:
            # KeyboardInterrupt included: nothing half-written stays behind.
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def sweep(self) -> None:
        """Remove temp folders left by writers that no longer run (killed mid-stage).

        Only this host's writers are judged: a pid means nothing on another node of a shared cache.
        """
        tmp_root = self.root / "tmp"
        if not tmp_root.is_dir():
            return
        for folder in tmp_root.iterdir():
            parts = folder.name.split(".")
            if len(parts) != 4 or parts[1] != _HOST:
                continue
            pid = int(parts[2]) if parts[2].isdigit() else -1
            if pid != os.getpid() and not _alive(pid):
                shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True))
