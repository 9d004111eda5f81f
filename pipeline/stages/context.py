"""What a running stage may use: the recipe, the resolved source, the progress reporter, ..."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cache.store import Entry
from pipeline.progress import Reporter
from pipeline.recipe.load import LoadedRecipe
from pipeline.sources import ResolvedSource


@dataclass
class RunContext:
    """Injected into every stage: nothing here is global.

    Attributes:
        loaded: the recipe and its file.
        source: the pinned source.
        storage_root: where publish writes.
        device: ``cpu`` or ``cuda`` for evaluation and calibration.
        reporter: progress and warnings.
        plan: the plan being executed (keys, data digests, tool versions).
    """

    loaded: LoadedRecipe
    source: ResolvedSource
    storage_root: Path
    device: str
    reporter: Reporter
    plan: Any

    @property
    def recipe(self):
        return self.loaded.recipe

    def variant(self, name: str):
        return next(v for v in self.recipe.variants if v.name == name)


@dataclass(frozen=True)
class StageInput:
    """An upstream stage's output: a cache entry (files + result) or a plain result."""

    result: dict[str, Any]
    entry: Entry | None = None

    @property
    def data(self) -> Path:
        if self.entry is None:
            raise ValueError("this input has no files")
        return self.entry.data
