"""What became of a stage in a run: the one vocabulary executors, reports and the CLI compare."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """A stage's outcome (a ``str``: reports and JSON show the plain value).

    Members:
        CACHED: its cache entry was reused.
        BUILT: it ran and its output is now cached.
        RAN: an uncached stage ran.
        NEEDS: not run: this machine (or cluster) lacks what it requires, or an input was not built
            for that reason.
        SKIPPED: nothing to do (the runner said why).
    """

    CACHED = "cached"
    BUILT = "built"
    RAN = "ran"
    NEEDS = "needs"
    SKIPPED = "skipped"

    @property
    def not_built(self) -> bool:
        """Whether the stage produced nothing a later stage could use."""
        return self in (Status.NEEDS, Status.SKIPPED)
