"""``modelbuild watch``: which recipes no longer match what they were built from.

For each recipe the source is resolved again, cheaply (a Hub branch → its current commit with one
API call; a local checkpoint or GGUF file → its digests), and the data corpora are re-hashed;
both are compared with the recipe's lock file (``<recipe>.lock.json``, written by ``lock`` and by
every rebuild). A recipe is *current* when nothing moved, *stale* when something did (each change
named), and *unknown* when the source could not be asked (Hub unreachable or offline, revision
deleted): "could not check" is never reported as "nothing new". The recipe's ``watch`` rules add
*new release*: a new tag on the source repo or a new repo of a watched author matching a pattern,
against the releases the lock has seen. A new release rebuilds nothing by itself (the recipe
still names what it built); ``modelbuild lock`` acknowledges it.

Exit codes, for schedulers (outside the range the other commands use):
0 nothing new · 10 stale recipes or new releases found (not rebuilt) · 11 stale recipes rebuilt ·
12 some recipes could not be checked · 13 a rebuild failed. When several apply, the most urgent
wins: 13, then 12, then 11/10.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

NOTHING_NEW, STALE, REBUILT, UNKNOWN, FAILED = 0, 10, 11, 12, 13


@dataclass
class Check:
    recipe: Path
    status: str  # current | stale | new release | unknown
    changes: list[str] = field(default_factory=list)
    reason: str | None = None

    def as_dict(self) -> dict:
        return {"recipe": str(self.recipe), "status": self.status, "changes": self.changes, "reason": self.reason}


def check(recipe_path: Path) -> Check:
    """Compare one recipe's source and data, as they are now, with its lock file.

    Raises:
        RecipeError: the recipe itself is broken (that is the caller's input, not the upstream's).
    """
    from pipeline.errors import ModelbuildError
    from pipeline.plan.build import corpus_digests
    from pipeline.recipe.load import load_recipe
    from pipeline.run import lockfile
    from pipeline.sources import resolve
    from pipeline.sources.hub import releases

    loaded = load_recipe(recipe_path)
    recipe = loaded.recipe
    if recipe.source.kind == "hub" and os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return Check(recipe_path, "unknown", reason="HF_HUB_OFFLINE is set: the Hub cannot be asked for new commits")
    try:
        provenance = resolve(recipe.source).provenance
        data = corpus_digests(recipe)
    except ModelbuildError as e:
        return Check(recipe_path, "unknown", reason=e.render())
    locked = lockfile.read(loaded.lock_path)
    if locked is None:
        return Check(recipe_path, "stale", [f"no lock file {loaded.lock_path.name}: not built under a lock yet"])
    now = {"recipe_sha256": loaded.digest, "source": provenance, "data": data}
    changes = lockfile.differences({k: locked.get(k) for k in now}, now)
    if changes:
        return Check(recipe_path, "stale", changes)
    if recipe.watch.any():
        try:
            found = new_releases(locked, releases(recipe))
        except ModelbuildError as e:
            return Check(recipe_path, "unknown", reason=e.render())
        if found:
            return Check(recipe_path, "new release", found)
    return Check(recipe_path, "current")


def rebuild(recipe_path: Path, *, cache_dir: Path | None, storage: str | None) -> tuple[bool, str]:
    """Run a stale recipe as ``modelbuild run`` would (reports included) and refresh its lock
    when every gate passed. Returns ``(ok, what happened)``."""
    import time

    from pipeline.errors import GateFailed, ModelbuildError
    from pipeline.progress import Reporter
    from pipeline.run import lockfile
    from pipeline.run.orchestrate import prepare
    from pipeline.run.orchestrate import run as run_prepared
    from pipeline.run.report import default_folder, write_for_run
    from pipeline.stages.gate import failure_lines

    prepared, report, started = None, None, time.time()
    try:
        reporter = Reporter()
        prepared = prepare(recipe_path, cache_dir=cache_dir, storage=storage, reporter=reporter)
        report = run_prepared(prepared, reporter=reporter)
        failures = [line for o in report.outcomes.values() if o.stage.kind == "gate" and "checks" in o.result
                    for line in failure_lines(o.stage.variant or o.stage.id, o.result)]
        if failures:
            raise GateFailed(failures)
        lockfile.write(prepared)
        ok, message, error, code = True, "rebuilt", None, 0
    except ModelbuildError as e:
        ok, message, error, code = False, f"rebuild failed: {e.render()}", e.render(), e.exit_code
    if prepared is not None:  # the rebuild's reports, as `run` writes them
        write_for_run(default_folder(prepared.loaded.recipe.name), prepared, report, exit_code=code, error=error,
                      seconds=time.time() - started)
    return ok, message


def new_releases(locked: dict | None, now: dict[str, list[str]]) -> list[str]:
    """``new tag: v2``, ``new repo: org/name`` for what the lock has not seen."""
    seen = (locked or {}).get("releases") or {"tags": [], "repos": []}
    return ([f"new tag: {t}" for t in now["tags"] if t not in seen.get("tags", [])]
            + [f"new repo: {r}" for r in now["repos"] if r not in seen.get("repos", [])])


def exit_code(checks: list[Check], rebuilt: int, failed: int) -> int:
    if failed:
        return FAILED
    if any(c.status == "unknown" for c in checks):
        return UNKNOWN
    if rebuilt:
        return REBUILT
    if any(c.status in ("stale", "new release") for c in checks):
        return STALE
    return NOTHING_NEW
