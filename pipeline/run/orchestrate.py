"""The steps behind ``modelbuild plan`` and ``modelbuild run``, with everything that varies injected."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.backends import get_backend
from pipeline.cache.store import CacheStore
from pipeline.executors import local, ray_cluster
from pipeline.executors.scheduler import Report
from pipeline.plan.build import Plan, build_plan
from pipeline.progress import Reporter
from pipeline.recipe.load import LoadedRecipe, load_recipe
from pipeline.run import lockfile
from pipeline.stages.context import RunContext
from pipeline.storage.location import default_root, open_storage


def default_cache_dir() -> Path:
    env = os.environ.get("MODELBUILD_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "modelbuild"


def storage_root(loaded: LoadedRecipe, override: str | os.PathLike[str] | None) -> str:
    """``--storage``, else the recipe's ``publish.root``, else ``./artifacts`` (a folder or a URL)."""
    if override is not None:
        override = str(override)
        if "://" in override:
            return override
        try:
            return str(Path(override).expanduser().resolve())
        except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError on Python 3.11)
            from pipeline.errors import StorageError

            raise StorageError(f"cannot resolve the storage root: {e}", where="--storage", fix="check the path") from None
    if loaded.recipe.publish.root is not None:
        return loaded.recipe.publish.root
    return default_root()


@dataclass(frozen=True)
class ExecutorChoice:
    """One way to run a plan.

    Attributes:
        execute: (plan, context, cache, cluster address or None) -> the run's report.
        checks_device: whether ``--device`` names this machine's device (checked before the run)
            rather than the executor's workers' (on Ray, ``cuda`` asks for the cluster's GPUs).
    """

    execute: Callable[[Plan, RunContext, CacheStore, str | None], Report]
    checks_device: bool


def _local(plan: Plan, ctx: RunContext, store: CacheStore, address: str | None) -> Report:
    return local.execute(plan, ctx, store)


def _ray(plan: Plan, ctx: RunContext, store: CacheStore, address: str | None) -> Report:
    return ray_cluster.execute(plan, ctx, store, address=address or "local")


# ``--executor`` -> how the plan runs: ``local`` (this machine, one stage at a time) or ``ray``
# (stages as Ray tasks across a cluster sharing the cache; ``address`` ``local`` starts one here).
EXECUTORS: dict[str, ExecutorChoice] = {
    "local": ExecutorChoice(_local, checks_device=True),
    "ray": ExecutorChoice(_ray, checks_device=False),
}


@dataclass
class Prepared:
    """A planned recipe, for ``executor``; ``device``: where its GPU-capable stages compute
    (their keys name it)."""

    loaded: LoadedRecipe
    plan: Plan
    store: CacheStore
    storage: str
    device: str = "cpu"
    executor: str = "local"


def prepare(recipe_path: Path, *, cache_dir: Path | None, storage: str | os.PathLike[str] | None, reporter: Reporter,
            device: str = "auto", executor: str = "local") -> Prepared:
    """Load, check and plan a recipe for ``--device`` under ``executor`` (a name in
    ``EXECUTORS``); no stage runs.

    Raises:
        ModelbuildError: any bad input, before any work starts.
    """
    from pipeline.quality.runner import compute_device

    device = compute_device(device, here=EXECUTORS[executor].checks_device)
    loaded = load_recipe(recipe_path)
    for name in sorted({v.backend for v in loaded.recipe.variants}):
        get_backend(name).check_environment()
    store = CacheStore(cache_dir or default_cache_dir(), warn=reporter.warn)
    plan = build_plan(loaded, store=store, device=device)
    return Prepared(loaded, plan, store, storage_root(loaded, storage), device, executor)


def run(prepared: Prepared, *, reporter: Reporter, locked: bool = False, address: str | None = None) -> Report:
    """Execute a prepared plan: the lock (under ``locked``) and the storage root are checked
    first, so nothing runs for nothing. A Hub source's resolution is recorded in the lock.

    ``address``: the Ray cluster's, when the executor is ``ray``."""
    chosen = EXECUTORS[prepared.executor]
    if locked:
        lockfile.check(prepared)
    open_storage(prepared.storage, s3=prepared.loaded.recipe.publish.s3.model_dump(exclude_none=True)).check_writable()
    if not locked and prepared.plan.source.kind == "hub":
        lockfile.write(prepared)
    ctx = RunContext(
        loaded=prepared.loaded,
        source=prepared.plan.source,
        storage_root=prepared.storage,
        requested_device=prepared.device,
        reporter=reporter,
        plan=prepared.plan,
    )
    return chosen.execute(prepared.plan, ctx, prepared.store, address)
