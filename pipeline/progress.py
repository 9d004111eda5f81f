"""Progress of a run, one view wherever it is read: a terminal, a CI log, a dashboard.

``Reporter`` is injected into stages (``ctx.reporter``). Its mode decides what it prints, always
to stderr (stdout stays for results):

- ``terminal``: stage lines above live bars (the stage, run elapsed and ETA; the current step);
- ``log`` (stderr is not a terminal): plain stage lines with run elapsed and ETA, step lines,
  and a heartbeat line at least every ``MODELBUILD_PROGRESS_INTERVAL`` seconds (default 30)
  while the run is busy: stage i/N, time in the stage, run elapsed, ETA, the step's k/L;
- ``json`` (``--json-progress``): the same events, one JSON object per line;
- ``quiet`` (``--quiet``): warnings only (errors are printed by the CLI).

The ETA adds the expected seconds of the stages still to build (``pipeline.cache.durations``)
to what is left of the current one (extrapolated from its step's k/L when it has one).

Library progress bars (tqdm: llm-compressor, compressed-tensors, transformers, datasets,
huggingface_hub) are folded in: during a run ``sys.stderr`` is a stream that parses their bars
into the current step's detail and passes every other line (warnings) through, so bars never
interleave with the run's lines. Backends report their own steps through ``steps()`` (module
level), which reaches the reporter of the run in progress.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from pipeline.errors import redact

INTERVAL_ENV = "MODELBUILD_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
MODES = ("terminal", "log", "json", "quiet")

_ACTIVE: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("modelbuild_reporter", default=None)


def interval_from_env() -> float:
    """``MODELBUILD_PROGRESS_INTERVAL`` in seconds (default 30; nonsense falls back to it)."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def memory(nbytes: int) -> str:
    """``412 MB``, ``2.31 GB`` (decimal units, as file sizes print)."""
    return f"{nbytes / 1e6:.0f} MB" if nbytes < 1e9 else f"{nbytes / 1e9:.2f} GB"


@dataclass
class PlannedStage:
    """What the reporter knows of a stage before it runs.

    Attributes:
        id: the stage id.
        estimate: expected seconds (0 when served from the cache), None when never timed.
        cached: its output is in the cache already (nothing to build).
        kind: the stage's kind: a stage never timed before is expected to take what this run's
            builds of the same kind took.
    """

    id: str
    estimate: float | None
    cached: bool = False
    kind: str | None = None


@dataclass
class _Step:
    description: str
    total: int
    started: float
    done: int = 0
    shown: int = -1  # the last bucket printed (log lines / JSON events are per bucket, not per unit)
    task: object = None


@dataclass
class _Run:
    started: float
    plan: list[PlannedStage]
    finished: set[str] = field(default_factory=set)
    running: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (index, started)
    since: float = 0.0  # when the last stage ended: an uncached stage (no start line) began then
    last_eta_line: float = 0.0
    learned: dict[str, list[float]] = field(default_factory=dict)  # kind -> this run's build seconds

    def expected(self, planned: PlannedStage) -> float | None:
        if planned.estimate is not None:
            return planned.estimate
        seen = self.learned.get(planned.kind or "")
        return sorted(seen)[len(seen) // 2] if seen else None


class RunReporter(Protocol):
    """What a run uses of its reporter (``RunContext.reporter``): a ``Reporter``, or a silent
    stand-in where another process prints the run's lines (stages on remote Ray nodes)."""

    def run(self, plan: Sequence[PlannedStage]) -> contextlib.AbstractContextManager[object]: ...

    def stage(self, index: int, total: int, stage_id: str, status: str, seconds: float | None = None,
              peak_bytes: int | None = None) -> None: ...

    def warn(self, message: str) -> None: ...

    def steps(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[..., None]]: ...


class Reporter:
    """Stage lines, steps, warnings and heartbeats of a run.

    Args:
        console: where to print (stderr by default, so stdout stays for results).
        mode: one of ``MODES``; default ``terminal`` when the console is a terminal, else ``log``.
        interval: seconds between heartbeat lines (default ``MODELBUILD_PROGRESS_INTERVAL``).
        clock: monotonic seconds (tests inject one).
        wait: ``wait(timeout) -> stop`` for the heartbeat thread: blocks up to ``timeout``
            seconds, returns True when the run is over. Default: waits on the reporter's stop
            event; tests inject one that they release.
    """

    def __init__(self, console: Console | None = None, *, mode: str | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, wait: Callable[[float], bool] | None = None):
        self.console = console or Console(stderr=True)
        if mode is None:
            mode = "terminal" if self.console.is_terminal else "log"
        if mode not in MODES:
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.interval = interval if interval is not None else interval_from_env()
        self._clock = clock
        self._stop = threading.Event()
        self._wait = wait or self._stop.wait
        self._lock = threading.RLock()
        self._run: _Run | None = None
        self._steps: list[_Step] = []
        self._library: tuple[str, str, str] | None = None  # the latest library bar: (what, n, total)
        self._live: Progress | None = None
        self._live_stage = None
        self._live_library = None

    # -- the run ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def run(self, plan: Sequence[PlannedStage]) -> Iterator[Reporter]:
        """The run's span: heartbeats, the ETA, library bars folded in; restores stderr after."""
        clock = self._clock()
        self._run = _Run(started=clock, plan=list(plan), since=clock, last_eta_line=clock)
        self._stop.clear()
        token = _ACTIVE.set(self)
        self._emit_event({"event": "run", "stages": len(plan), "to_build": sum(1 for p in plan if not p.cached),
                          "eta_s": self._eta_seconds()[0]}, text=None)
        original = sys.stderr
        previous = self.console.file
        if previous is original:  # a console following sys.stderr must not follow it into the fold
            self.console.file = original
        fold = sys.stderr = _Fold(self._library_bar, self._library_text, original)
        beat = None
        try:
            if self.mode == "terminal":
                self._live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[eta]}"), console=self.console,
                                      transient=True, redirect_stderr=False, redirect_stdout=False)
                self._live.start()
            elif self.mode in ("log", "json"):
                beat = threading.Thread(target=self._beat_loop, name="modelbuild-heartbeat", daemon=True)
                beat.start()
            yield self
        finally:
            self._stop.set()
            if beat is not None:
                beat.join(timeout=10)
            if self._live is not None:
                self._live.stop()
                self._live = self._live_stage = self._live_library = None
            fold.flush()  # a last line without its line end still reaches the log
            sys.stderr = original
            self.console.file = previous
            _ACTIVE.reset(token)
            self._emit_event({"event": "end", "elapsed_s": round(self._clock() - self._run.started, 3)}, text=None)
            self._run = None

    def _beat_loop(self) -> None:
        while True:
            with self._lock:
                due = self._run.last_eta_line + self.interval - self._clock() if self._run else self.interval
            if self._wait(max(0.0, due)):
                return
            self.tick()

    def tick(self) -> None:
        """A heartbeat, when the run is busy and no line with its ETA was printed for an interval."""
        with self._lock:
            run = self._run
            if run is None or self.mode not in ("log", "json"):
                return
            now = self._clock()
            if now - run.last_eta_line < self.interval:
                return
            current = self._current()
            if current is None:
                return
            stage_id, index, started = current
            eta, unknown = self._eta_seconds()
            event = {"event": "heartbeat", "stage": stage_id, "index": index, "total": len(run.plan),
                     "stage_elapsed_s": round(now - started, 1), "elapsed_s": round(now - run.started, 1),
                     "eta_s": eta, "eta_unknown_stages": unknown, **self._step_fields()}
            detail = self._detail()
            text = (f"[{index}/{len(run.plan)}] {stage_id} … {duration(now - started)} in stage"
                    + (f", {detail}" if detail else "") + f" ({self._timing(now)})")
            self._emit_event(event, text=text)
            run.last_eta_line = now

    def _current(self) -> tuple[str, int, float] | None:
        """The stage in progress: one that said so, else (uncached stages print no start line)
        the first unfinished one of the plan, begun when the last stage ended."""
        run = self._run
        if run is None:
            return None
        if run.running:
            stage_id, (index, started) = next(reversed(run.running.items()))
            return stage_id, index, started
        for index, planned in enumerate(run.plan, 1):
            if planned.id not in run.finished:
                return planned.id, index, run.since
        return None

    def _eta_seconds(self) -> tuple[float | None, int]:
        """Seconds left (None before any estimate exists) and how many stages have none."""
        run = self._run
        if run is None:
            return None, 0
        now = self._clock()
        left, unknown, known = 0.0, 0, False
        current = self._current()
        for planned in run.plan:
            if planned.id in run.finished:
                continue
            if current is not None and planned.id == current[0]:
                rest = self._current_rest(planned, now - current[2])
                if rest is None:
                    unknown += 1
                else:
                    left, known = left + rest, True
            else:
                expected = run.expected(planned)
                if expected is None:
                    unknown += 1
                else:
                    left, known = left + expected, True
        return (round(left, 1) if known or not unknown else None), unknown

    def _current_rest(self, planned: PlannedStage, elapsed: float) -> float | None:
        step = self._steps[0] if self._steps else None  # the outermost step spans most of the stage
        if step is not None and step.total > 0 and step.done > 0:
            return (self._clock() - step.started) * (step.total - step.done) / step.done
        expected = self._run.expected(planned) if self._run is not None else None
        if expected is None:
            return None
        return max(0.0, expected - elapsed)

    def _timing(self, now: float) -> str:
        eta, unknown = self._eta_seconds()
        elapsed = f"run {duration(now - self._run.started)}" if self._run is not None else "run"
        if eta is None:
            return f"{elapsed}, ETA unknown"
        return f"{elapsed}, ETA {duration(eta)}" + (f" + {unknown} untimed stage{'s' * (unknown > 1)}" if unknown else "")

    # -- stages --------------------------------------------------------------------------------

    def stage(self, index: int, total: int, stage_id: str, status: str, seconds: float | None = None,
              peak_bytes: int | None = None) -> None:
        """A stage started (``status`` ``running``) or ended (any other status, rich markup allowed);
        a built stage's line shows its seconds and, where measured, its peak resident memory."""
        with self._lock:
            now = self._clock()
            run = self._run
            if run is not None:
                if status == "running":
                    run.running[stage_id] = (index, now)
                else:
                    run.running.pop(stage_id, None)
                    run.finished.add(stage_id)
                    planned = next((p for p in run.plan if p.id == stage_id), None)
                    if seconds is not None and planned is not None and planned.kind is not None:
                        run.learned.setdefault(planned.kind, []).append(seconds)
                    run.since = now
                    self._steps.clear()
                    self._library = None
            plain = Text.from_markup(status).plain
            event = {"event": "stage", "index": index, "total": total, "stage": stage_id,
                     "status": "running" if status == "running" else plain, "seconds": seconds}
            if peak_bytes is not None:
                event["peak_rss_bytes"] = peak_bytes
            timing = f" [dim]{seconds:.1f}s[/dim]" if seconds is not None else ""
            if peak_bytes is not None:
                timing += f" [dim]peak {memory(peak_bytes)}[/dim]"
            text = f"[{index}/{total}] {stage_id}: {status}{timing}"
            if run is not None:
                eta, unknown = self._eta_seconds()
                event.update(elapsed_s=round(now - run.started, 1), eta_s=eta, eta_unknown_stages=unknown)
                if self.mode == "log":  # every line carries the ETA: it resets the heartbeat's due time
                    text += f" ({self._timing(now)})"
                run.last_eta_line = now
            if self._live is not None:
                self._show_live_stage(index, total, stage_id, status)
            # soft_wrap: a published path stays on its line (and greppable) in narrow or piped output
            self._emit_event(event, text=text, markup=True)

    def _show_live_stage(self, index: int, total: int, stage_id: str, status: str) -> None:
        eta, unknown = self._eta_seconds()
        label = escape(f"[{index}/{total}] {stage_id}" if status == "running" else f"[{index}/{total}] after {stage_id}")
        eta_text = "ETA ?" if eta is None else f"ETA {duration(eta)}" + ("+" if unknown else "")
        if self._live is None or self._run is None:
            return
        if self._live_stage is None:
            self._live_stage = self._live.add_task(label, total=total, eta=eta_text)
        self._live.update(self._live_stage, description=label, completed=len(self._run.finished), eta=eta_text)

    def warn(self, message: str) -> None:
        with self._lock:
            # Escaped: a message quoting a library or a path keeps its brackets.
            self._emit_event({"event": "warning", "message": message},
                             text=f"[yellow]warning:[/yellow] {escape(message)}", markup=True, always=True)

    # -- steps inside a stage ----------------------------------------------------------------

    @contextlib.contextmanager
    def steps(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """A step of ``total`` units inside the running stage; yields ``advance(n=1)``."""
        if self._run is None and self.mode == "terminal":
            with self._standalone_bar(description, total) as advance:
                yield advance
            return
        step = _Step(description, total, self._clock())
        with self._lock:
            self._steps.append(step)
            if self._live is not None:
                step.task = self._live.add_task(escape(f"  {description}"), total=total, eta="")
            self._step_event(step)
        try:
            yield lambda n=1: self._advance(step, n)
        finally:
            with self._lock:
                if step in self._steps:
                    self._steps.remove(step)
                if step.task is not None and self._live is not None:
                    self._live.remove_task(step.task)

    @contextlib.contextmanager
    def _standalone_bar(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """Outside a run (a stage called on its own): a transient bar of its own."""
        with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)

    def _advance(self, step: _Step, n: int) -> None:
        with self._lock:
            step.done = min(step.total, step.done + n) if step.total else step.done + n
            if step.task is not None and self._live is not None:
                self._live.update(step.task, completed=step.done)
            self._step_event(step)

    def _step_event(self, step: _Step) -> None:
        """A line per unit for short steps (layers, shards), per tenth (log) or hundredth (JSON)
        for long ones (windows), so a log stays readable whatever the step's length."""
        if self.mode not in ("log", "json"):
            return
        buckets = 100 if self.mode == "json" else 10
        bucket = step.done if step.total <= buckets else step.done * buckets // step.total
        if bucket == step.shown:
            return
        step.shown = bucket
        current = self._current()
        stage = current[0] if current is not None else None
        self._emit_event({"event": "step", "stage": stage, "step": step.description, "done": step.done,
                          "total": step.total}, text=f"  {step.description}: {step.done}/{step.total}")

    def _step_fields(self) -> dict:
        fields: dict = {"step": None}
        if self._steps:
            step = self._steps[-1]
            fields = {"step": step.description, "step_done": step.done, "step_total": step.total}
        if self._library is not None:
            fields["library"] = {"what": self._library[0], "done": self._library[1], "total": self._library[2]}
        return fields

    def _detail(self) -> str:
        parts = [f"{s.description} {s.done}/{s.total}" for s in self._steps]
        if self._library is not None:
            what, n, total = self._library
            parts.append(f"{what} {n}/{total}" if total else f"{what} {n}")
        return ", ".join(parts)

    # -- library output (the fold) -------------------------------------------------------------

    def _library_bar(self, what: str, n: str, total: str) -> None:
        with self._lock:
            self._library = (what, n, total)
            if self._live is not None:
                label = f"  {what}: {n}/{total}" if total else f"  {what}: {n}"
                if self._live_library is None:
                    self._live_library = self._live.add_task(escape(label), total=None, eta="")
                self._live.update(self._live_library, description=escape(label))

    def _library_text(self, line: str) -> None:
        """A library's line that is not a progress bar (a warning, a notice): passed through."""
        with self._lock:
            self._emit_event({"event": "log", "text": line}, text=line, always=True)

    # -- output --------------------------------------------------------------------------------

    def _emit_event(self, event: dict, *, text: str | None, markup: bool = False, always: bool = False) -> None:
        """One event: a JSON line (json mode), a text line (terminal, log), nothing (quiet,
        unless ``always``: warnings and library notices)."""
        # Library notices pass through here too: no credential they carry is printed.
        text = None if text is None else redact(text)
        if self.mode == "json":
            self._write(redact(json.dumps(event, default=str)))
        elif text is None or (self.mode == "quiet" and not always):
            return
        elif self._live is not None:
            self._live.console.print(text if markup else Text(text), highlight=False, soft_wrap=True)
        elif self.mode == "log":
            self._write(Text.from_markup(text).plain if markup else text)
        else:
            self.console.print(text if markup else Text(text), highlight=False, soft_wrap=True)

    def _write(self, line: str) -> None:
        stream = self.console.file
        stream.write(line + "\n")
        stream.flush()


@contextlib.contextmanager
def steps(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A step of the run in progress (for code that is handed no reporter: backends); outside a
    run it reports nothing."""
    reporter = _ACTIVE.get()
    if reporter is None:
        yield lambda n=1: None
        return
    with reporter.steps(description, total) as advance:
        yield advance


def active() -> Reporter | None:
    """The reporter of the run in progress in this context, if any."""
    return _ACTIVE.get()


def tool_bars() -> Callable[[str], None]:
    """A line handler for a tool's captured output (a subprocess): its progress bars become the
    run's library detail; other lines are left to the caller (kept for error messages)."""
    reporter = _ACTIVE.get()
    if reporter is None:
        return lambda line: None

    def on_line(line: str) -> None:
        bar = parse_bar(line)
        if bar is not None:
            reporter._library_bar(*bar)

    return on_line


def parse_bar(text: str) -> tuple[str, str, str] | None:
    """``(what, n, total)`` of a tqdm frame (total ``""`` when it has none), else None."""
    m = _BAR.match(text) or _COUNTER.match(text)
    if m is None:
        return None
    return m["what"].strip() or "working", m["n"].strip(), (m.groupdict().get("total") or "").strip()


# tqdm's default bar: "<desc>: 42%|████▏     | 21/50 [00:03<00:04, 6.1it/s]"; without a total:
# "<desc>: 21it [00:03, 6.1it/s]".
_BAR = re.compile(r"^\s*(?P<what>.*?):?\s*\d{1,3}%\|.*?\|\s*(?P<n>[\d.]+\s*[kMGTPEZY]?)/(?P<total>[\d.]+\s*[kMGTPEZY]?)")
_COUNTER = re.compile(r"^\s*(?P<what>.*?):?\s*(?P<n>[\d.]+[kMGTPEZY]?)(?:it| ?[kMGT]?B)\s*\[\d")


class _Fold(io.TextIOBase):
    """``sys.stderr`` during a run: tqdm bars become the reporter's library detail; every other
    line goes on through the reporter. tqdm redraws with ``\\r`` and writes each frame whole, so a
    frame is recognised in the write that carries it."""

    def __init__(self, on_bar: Callable[[str, str, str], None], on_text: Callable[[str], None], original):
        self._on_bar, self._on_text, self._original = on_bar, on_text, original
        self._pending = ""
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            parts = re.split(r"[\r\n]", self._pending + s)
            self._pending = parts.pop()
            if self._pending and self._bar(self._pending):  # a frame without its line end yet
                self._pending = ""
        for part in parts:
            if part.strip() and not self._bar(part):
                self._on_text(part.rstrip())
        return len(s)

    def _bar(self, text: str) -> bool:
        bar = parse_bar(text)
        if bar is None:
            return "%|" in text  # a bar in a format of its own: dropped, never interleaved
        self._on_bar(*bar)
        return True

    def flush(self) -> None:
        pending, self._pending = self._pending, ""
        if pending.strip() and not self._bar(pending):
            self._on_text(pending.rstrip())

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # code writing at the descriptor level (faulthandler) reaches the real stderr
        return self._original.fileno()

    @property
    def encoding(self):
        return getattr(self._original, "encoding", "utf-8")

    def writable(self) -> bool:
        return True
