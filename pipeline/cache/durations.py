"""How long stages took before, kept in one small index in the cache root, for a run's ETA.

``<root>/durations.json`` holds, per stage key, the seconds its last build took; per work (a
stage kind with the same parameters, on any input) and per kind, the seconds of the latest
builds. An estimate prefers the most specific record: the same key (an entry since evicted, or
an uncached stage such as publish), then the same work, then the median of the kind.

The index is read once and written once per run (the executor records the run's outcomes), so a
large cache is never scanned on every run. The first run on a cache without an index builds it
once from the entries' ``entry.json`` (each records ``seconds`` and its stage's kind and
parameters). Writes are atomic (a temp file renamed over the index); two runs finishing together
may drop one run's records, which only makes an estimate rest on one build fewer.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.files import atomic_write
from pipeline.hashing import digest_json

INDEX = "durations.json"
FORMAT = 1
KEEP_PER_GROUP = 20  # recent builds per work and per kind: the median follows the machine in use
KEEP_KEYS = 2000  # stage keys remembered (oldest dropped): bounds the file at a few hundred kB
BOOTSTRAP_LIMIT = 5000  # entry.json files read to seed a missing index: one bounded scan


def work_of(kind: str, params: dict[str, Any]) -> str:
    """The same work on any input: the kind and a digest of the parameters."""
    return f"{kind}:{digest_json(params)[:16]}"


class Durations:
    """The index of one cache root.

    Args:
        root: the cache folder (the index is created there on the first record).
    """

    def __init__(self, root: Path):
        self.path = Path(root) / INDEX
        self.seeded = False  # built from the entries just now: worth saving even if nothing is added
        self._data = self._load(Path(root))

    def _load(self, root: Path) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") == FORMAT:
                return data
        except FileNotFoundError:
            data = _bootstrap(root)
            self.seeded = bool(data["keys"])
            return data
        except (OSError, ValueError, AttributeError):
            pass  # unreadable or foreign: estimates start over rather than fail the run
        return _empty()

    def estimate(self, key: str, kind: str, params: dict[str, Any]) -> float | None:
        """Expected seconds for the stage, or None when nothing like it was ever timed."""
        if key in self._data["keys"]:
            return float(self._data["keys"][key])
        for group, name in (("work", work_of(kind, params)), ("kinds", kind)):
            seconds = self._data[group].get(name)
            if seconds:
                return float(statistics.median(seconds))
        return None

    def add(self, key: str, kind: str, params: dict[str, Any], seconds: float) -> None:
        """Remember one build (in memory; ``save`` writes the index)."""
        seconds = round(float(seconds), 3)
        keys = self._data["keys"]
        keys.pop(key, None)  # re-inserted last: the dict's order is the age order
        keys[key] = seconds
        while len(keys) > KEEP_KEYS:
            del keys[next(iter(keys))]
        for group, name in (("work", work_of(kind, params)), ("kinds", kind)):
            recent = self._data[group].setdefault(name, [])
            recent.append(seconds)
            del recent[:-KEEP_PER_GROUP]
        if len(self._data["work"]) > KEEP_KEYS:
            del self._data["work"][next(iter(self._data["work"]))]

    def save(self) -> None:
        """Write the index atomically; a cache root that cannot be written keeps no history."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Not durable: a crash can lose the latest records, never leave a torn index.
            atomic_write(self.path, json.dumps(self._data, sort_keys=True), durable=False)
        except OSError:
            pass


def _empty() -> dict[str, Any]:
    return {"format": FORMAT, "keys": {}, "work": {}, "kinds": {}}


def _bootstrap(root: Path) -> dict[str, Any]:
    """A first index from the entries already in the cache (bounded; oldest first)."""
    index = Durations.__new__(Durations)
    index._data = _empty()
    records = []
    for path in _entry_files(root):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            describe = record["describe"]
            records.append((record.get("created", ""), record["key"], describe["kind"], describe["params"],
                            float(record["seconds"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged entry is the store's business, not the estimate's
    for _created, key, kind, params, seconds in sorted(records, key=lambda r: r[0]):
        index.add(key, kind, params, seconds)
    return index._data


def _entry_files(root: Path) -> Iterable[Path]:
    objects = root / "objects"
    if not objects.is_dir():
        return []
    found = []
    for shard in objects.iterdir():
        for entry in shard.iterdir() if shard.is_dir() else ():
            found.append(entry / "entry.json")
            if len(found) >= BOOTSTRAP_LIMIT:
                return found
    return found
