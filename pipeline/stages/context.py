"""What a running stage may use: the recipe, the resolved source, the progress reporter, ..."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cache.store import Entry
from pipeline.errors import StageError
from pipeline.progress import RunReporter
from pipeline.recipe.load import LoadedRecipe
from pipeline.sources import ResolvedSource
from pipeline.stages.status import Status


@dataclass
class RunContext:
    """Injected into every stage: nothing here is global.

    Attributes:
        loaded: the recipe and its file.
        source: the pinned source.
        storage_root: where publish writes (a folder or a storage URL).
        requested_device: ``auto``, ``cpu`` or ``cuda``; ``device`` resolves it on first use (so
            a run served entirely from the cache never imports torch).
        reporter: progress and warnings.
        plan: the plan being executed (keys, data digests, tool versions).
    """

    loaded: LoadedRecipe
    source: ResolvedSource
    storage_root: str
    requested_device: str
    reporter: RunReporter
    plan: Any
    _device: str | None = None
    _storage: Any = None

    @property
    def device(self) -> str:
        if self._device is None:
            from pipeline.quality.runner import pick_device

            self._device = pick_device(self.requested_device)
        return self._device

    def compute_device(self, stage) -> str:
        """Where ``stage`` computes: the run's device when the stage was planned for it (a GPU
        build puts ``compute`` in the params, so in the key, of the stages that can use one),
        else the CPU; so a stage never computes elsewhere than its key says."""
        return self.device if "compute" in stage.params else "cpu"

    def storage(self):
        """The publish root's backend (opened on first use: a cached run never needs it)."""
        if self._storage is None:
            from pipeline.storage.location import open_storage

            self._storage = open_storage(self.storage_root, s3=self.recipe.publish.s3.model_dump(exclude_none=True))
        return self._storage

    @property
    def recipe(self):
        return self.loaded.recipe

    def variant(self, name: str | None):
        """The recipe's variant of that name (a stage's ``variant``).

        Raises:
            StageError: the stage belongs to no variant of the recipe (a planner bug).
        """
        found = next((v for v in self.recipe.variants if v.name == name), None)
        if found is None:
            raise StageError(f"no variant {name!r} in the recipe")
        return found


@dataclass(frozen=True)
class StageInput:
    """An upstream stage's output, handed to a runner under the role it plays there (see each
    runner's ``Inputs``): a cache entry (files + result) or a plain result."""

    result: dict[str, Any]
    entry: Entry | None = None
    status: Status = Status.CACHED

    @property
    def stored(self) -> Entry:
        """The cache entry.

        Raises:
            ValueError: the upstream stage is not cached (it has no files).
        """
        if self.entry is None:
            raise ValueError("this input has no files")
        return self.entry

    @property
    def data(self) -> Path:
        """The entry's files."""
        return self.stored.data
