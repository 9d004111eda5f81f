"""Progress reporting, injected into stages (tests pass a quiet one)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class Reporter:
    """Prints stage lines and progress bars for long steps.

    Args:
        console: where to print (stderr by default, so stdout stays for results).
    """

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)

    def stage(self, index: int, total: int, stage_id: str, status: str, seconds: float | None = None) -> None:
        timing = f" [dim]{seconds:.1f}s[/dim]" if seconds is not None else ""
        # soft_wrap: a published path stays on its line (and greppable) in narrow or piped output
        self.console.print(f"[{index}/{total}] {stage_id}: {status}{timing}", highlight=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)

    @contextlib.contextmanager
    def steps(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar; yields ``advance(n)``."""
        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        ) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)
