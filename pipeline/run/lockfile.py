"""``<recipe>.lock.json``: what a recipe resolved to, so a rebuild is the same build.

It records the source as resolved (a Hub branch's commit, a local checkpoint's or GGUF file's
digests), the calibration and evaluation data digests, the recipe's digest and the version of
every tool that shapes an output. ``modelbuild lock`` writes it; ``run`` refreshes it for Hub
sources (as a package manager refreshes its lock); ``run --locked`` refuses to build when what
it resolves now differs from the lock, naming each difference — the upstream moved, a tool was
upgraded, the data or the recipe changed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.files import atomic_write

LOCK_VERSION = 2


class LockMismatch(InputError):
    """``--locked`` and the lock file disagree with what the recipe resolves to now."""


def current(prepared) -> dict[str, Any]:
    """The lock a prepared plan implies (no timestamp)."""
    plan = prepared.plan
    return {
        "lock_version": LOCK_VERSION,
        "recipe_sha256": prepared.loaded.digest,
        "source": plan.source.provenance,
        "data": dict(plan.data),
        "tools": dict(plan.tool_versions),
    }


# What each section of a lock holds; a file with anything else was not written by `lock`.
_SECTIONS = {"lock_version": int, "recipe_sha256": str, "source": dict, "data": dict, "tools": dict}


def read(path: Path) -> dict[str, Any] | None:
    """The lock at ``path``; None only when there is no such file.

    Raises:
        LockMismatch: the file exists but is unreadable, not JSON, or not a lock (``null``, a list,
            a section of the wrong type): a broken lock is never mistaken for a missing one.
    """
    fix = "regenerate it: modelbuild lock RECIPE"
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LockMismatch(f"cannot read lock file {path.name}: {e.strerror or e}", where=str(path), fix=fix) from None
    except (ValueError, RecursionError):
        raise LockMismatch(f"lock file {path.name} is not valid JSON", where=str(path), fix=fix) from None
    if not isinstance(lock, dict):
        raise LockMismatch(f"lock file {path.name} is malformed: a JSON object expected, found {_kind(lock)}",
                           where=str(path), fix=fix)
    for key, kind in _SECTIONS.items():
        # A missing section is a difference `--locked` names (older locks lack some); a section of
        # the wrong type is damage. bool is an int to Python; a lock never holds one there.
        if key in lock and (not isinstance(lock[key], kind) or isinstance(lock[key], bool)):
            raise LockMismatch(f"lock file {path.name} is malformed: {key!r} is {_kind(lock[key])}, "
                               f"{_kind(kind())} expected", where=str(path), fix=fix)
    return lock


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


def differences(locked: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per field that changed, e.g. ``source.commit: 0123abcd… → 89ef0123…``."""
    out = []

    def short(value: Any) -> str:
        text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
        return text if len(text) <= 24 else text[:12] + "…"

    for section in ("recipe_sha256", "source", "data", "tools"):
        old, new = locked.get(section), now.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    out.append(f"{section}.{key}: {short(old.get(key))} → {short(new.get(key))}")
        elif old != new:
            out.append(f"{section}: {short(old)} → {short(new)}")
    return out


def check(prepared) -> None:
    """Raise LockMismatch unless the lock file exists and matches what was resolved now."""
    path = prepared.loaded.lock_path
    locked = read(path)
    if locked is None:
        raise LockMismatch(f"--locked but there is no lock file {path.name}", where=str(path),
                           fix=f"create it: modelbuild lock {prepared.loaded.path}")
    changed = differences(locked, current(prepared))
    if changed:
        raise LockMismatch(f"the recipe no longer resolves to its lock: {'; '.join(changed)}", where=str(path),
                           fix=f"review the change, then refresh the lock: modelbuild lock {prepared.loaded.path}")


def write(prepared, *, acknowledge_releases: bool = False) -> tuple[Path, bool]:
    """Write the lock (atomically); ``(path, changed)``. An unchanged lock keeps its file.

    With watch rules and ``acknowledge_releases`` (``modelbuild lock``), the upstream releases seen
    now are recorded (what ``watch`` compares against); otherwise the lock's earlier record is kept.
    Releases never enter ``--locked`` checks: they do not change what is built."""
    from pipeline.sources.hub import releases

    path = prepared.loaded.lock_path
    lock = current(prepared)
    try:
        old = read(path)
    except LockMismatch:
        old = None
    if acknowledge_releases and prepared.loaded.recipe.watch.any():
        lock["releases"] = releases(prepared.loaded.recipe)
    elif old is not None and old.get("releases") is not None:
        lock["releases"] = old["releases"]
    if (old is not None and not differences(old, lock) and old.get("lock_version") == LOCK_VERSION
            and old.get("releases") == lock.get("releases")):
        return path, False
    lock["resolved_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        atomic_write(path, json.dumps(lock, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        raise InputError(f"cannot write lock file {path.name}: {e.strerror or e}", where=str(path),
                         fix="make the recipe's folder writable (the lock file lives beside the recipe)") from None
    return path, True
