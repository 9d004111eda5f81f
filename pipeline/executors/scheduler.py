"""The one loop that runs a plan, whatever runs its stages.

The scheduler keeps the ready set (stages whose inputs have finished), assembles each stage's
inputs by role (``Stage.roles``, checked against its runner's ``Inputs``), applies the rule that a
stage whose input was not built is not built either (``blocked_by``), and collects the outcomes into
the report. An ``Executor`` only decides how a ready stage runs: here and now (``run_stage``), or
handed off and collected later (a Ray task).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.cache.store import CacheStore, Entry
from pipeline.errors import Interrupted, ModelbuildError, StageError, StageSkipped
from pipeline.executors.memory import Peak, PeakMemory
from pipeline.hardware import missing
from pipeline.memory import scored_window, shortfall
from pipeline.stages import runner
from pipeline.stages.base import Stage
from pipeline.stages.context import RunContext, StageInput
from pipeline.stages.status import Status


@dataclass(frozen=True)
class Outcome:
    """What happened to one stage.

    Attributes:
        status: see ``Status``; under ``needs``, ``result["needs"]`` says what is missing (or
            ``result["blocked_by"]`` which input was not built), under ``skipped``,
            ``result["reason"]`` why.
        result: the runner's result (for a cached stage, the one stored with its entry).
        seconds: how long it took here.
        entry: the cache entry of a cached kind's output.
        peak: the stage's peak resident memory where it ran (built or run stages on Linux; see
            ``executors.memory``); never part of a key or a manifest.
    """

    stage: Stage
    status: Status
    result: dict[str, Any]
    seconds: float
    entry: Entry | None = None
    peak: Peak | None = None


@dataclass
class Report:
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def ran(self) -> list[str]:
        """Ids of stages that did work (were not served from the cache)."""
        return [sid for sid, o in self.outcomes.items() if o.status == Status.BUILT]

    def not_built(self) -> list[Outcome]:
        """Stages that need hardware this machine lacks (the first of each chain)."""
        return [o for o in self.outcomes.values() if o.status == Status.NEEDS and "blocked_by" not in o.result]


class Executor(Protocol):
    """How ready stages run; the scheduler decides which are ready and what they get."""

    def submit(self, stage: Stage, inputs: dict[str, StageInput], progress: Progress) -> Outcome | None:
        """Run ``stage`` (its outcome) or hand it off (None: ``collect`` returns it later)."""

    def collect(self) -> tuple[Stage, Outcome] | None:
        """Wait for the next handed-off stage to finish; None when none is out."""

    def cancel(self) -> None:
        """Stop whatever is handed off (Ctrl-C)."""


@dataclass(frozen=True)
class Progress:
    """Where a stage sits in the run, for its ``running`` line."""

    ctx: RunContext
    index: int
    total: int

    def running(self, stage: Stage) -> None:
        self.ctx.reporter.stage(self.index, self.total, stage.id, "running")


def schedule(plan, ctx: RunContext, executor: Executor, report: Report | None = None) -> Report:
    """Run every stage of ``plan``: each as soon as its inputs are done (in plan order among the
    ready ones), through ``executor``.

    Args:
        report: the report to fill (an executor's own kind of report); a plain one otherwise.

    Raises:
        Interrupted: Ctrl-C (the running stage's temp output is removed first; handed-off stages
            are cancelled).
        StageError: a stage raised something unexpected.
        ModelbuildError: a stage found bad input.

    Whatever is raised carries ``report``: the outcomes of the stages that finished before it
    (variants already gated and published among them), so the run's reports match the store.
    """
    report = report if report is not None else Report()
    order = {s.id: i for i, s in enumerate(plan.stages, 1)}
    total = len(plan.stages)
    waiting = list(plan.stages)
    out = 0  # handed-off stages not collected yet

    def finish(stage: Stage, outcome: Outcome) -> None:
        report.outcomes[stage.id] = outcome
        built = outcome.status == Status.BUILT
        seconds = outcome.seconds if built else None
        peak = outcome.peak.process if built and outcome.peak is not None else None
        ctx.reporter.stage(order[stage.id], total, stage.id, describe(outcome), seconds, peak)

    try:
        while waiting or out:
            for stage in list(waiting):
                if any(d not in report.outcomes for d in stage.inputs + stage.after):
                    continue
                waiting.remove(stage)
                inputs = assemble(stage, report.outcomes)
                outcome = blocked(stage, report.outcomes)
                if outcome is None:
                    outcome = executor.submit(stage, inputs, Progress(ctx, order[stage.id], total))
                if outcome is None:
                    out += 1
                else:
                    finish(stage, outcome)
            if out:
                collected = executor.collect()
                if collected is None:
                    raise StageError(f"{out} handed-off stage(s) never came back")
                out -= 1
                finish(*collected)
            elif waiting:  # nothing out and nothing ready: an input that is not in the plan
                raise StageError(f"stages {[s.id for s in waiting]} wait for inputs that are not planned")
    except KeyboardInterrupt:  # between stages (a stage's own interrupt is converted in _guarded)
        executor.cancel()
        error = Interrupted("interrupted between stages" if not out else "interrupted; running stages were cancelled",
                            fix="nothing half-written was kept; rerun the same command to resume")
        error.report = report
        raise error from None
    except ModelbuildError as e:
        if out:
            executor.cancel()
        e.report = report
        raise
    return report


def assemble(stage: Stage, outcomes: dict[str, Outcome]) -> dict[str, StageInput]:
    """The stage's inputs (and ``after`` verdicts) by role, as its runner's ``Inputs`` declares.

    Raises:
        StageError: the planned roles are not the runner's (a planner bug).
    """
    declared = getattr(runner(stage.kind), "Inputs", None)
    if declared is not None:
        required, known = declared.__required_keys__, declared.__required_keys__ | declared.__optional_keys__
        roles = set(stage.roles)
        if not required <= roles <= known:
            raise StageError(f"stage {stage.id} is planned with inputs {sorted(roles)}, but {stage.kind} takes "
                             f"{sorted(required)} and optionally {sorted(known - required)}")
    return {role: _input(outcomes[sid]) for role, sid in stage.roles.items()}


def _input(outcome: Outcome) -> StageInput:
    return StageInput(outcome.result, outcome.entry, outcome.status)


def blocked(stage: Stage, outcomes: dict[str, Outcome]) -> Outcome | None:
    """The outcome of a stage one of whose inputs was not built (the first such input's status,
    its result and ``blocked_by``: that input's id); None when every input is there."""
    upstream = next((sid for sid in stage.inputs + stage.after if outcomes[sid].status.not_built), None)
    if upstream is None:
        return None
    was = outcomes[upstream]
    return Outcome(stage, was.status, {**was.result, "blocked_by": upstream}, 0.0)


def run_stage(ctx: RunContext, store: CacheStore, stage: Stage, inputs: dict[str, StageInput],
              progress: Progress | None = None) -> Outcome:
    """One stage, here: served from the cache, built into it, or (uncached kinds) run.

    Args:
        progress: says when a build starts (None on a remote node: the driver says it).
    """
    started = time.perf_counter()
    module = runner(stage.kind)
    try:
        if not stage.cached:
            with PeakMemory() as peak:
                result = _guarded(stage, lambda: module.run(ctx, stage, inputs))
            return Outcome(stage, Status.RAN, result, time.perf_counter() - started, peak=peak)
        entry = store.get(stage.key)  # built elsewhere (a shared cache) counts, whatever this machine is
        if entry is not None:
            return Outcome(stage, Status.CACHED, entry.result, time.perf_counter() - started, entry)
        lacking = missing(stage.hints.requires)
        checkpoint = inputs.get("checkpoint")
        # Refused before it starts rather than killed halfway by the kernel (pipeline.memory).
        short = shortfall(stage.hints.memory_model, checkpoint.entry.data if checkpoint and checkpoint.entry else None,
                          stage.id, seq_len=scored_window(stage))
        if short:
            lacking.append(short)
        if lacking:
            return Outcome(stage, Status.NEEDS, {"needs": lacking}, 0.0)
        if progress is not None:
            progress.running(stage)
        record = {"stage": stage.id, "kind": stage.kind, "params": stage.params}
        measure = PeakMemory()

        def build(out: Path) -> dict[str, Any]:
            with measure:
                result = module.run(ctx, stage, inputs, out)
            _hold_for_tests(stage.id)
            return result

        # The peak goes into entry.json beside the build's seconds, outside its result.
        entry = _guarded(stage, lambda: store.put(stage.key, build, record, measured=measure.peak.record))
        return Outcome(stage, Status.BUILT, entry.result, time.perf_counter() - started, entry, measure.peak)
    except StageSkipped as e:
        return Outcome(stage, Status.SKIPPED, {"reason": str(e)}, time.perf_counter() - started)


# Tests that interrupt a run mid-stage (Ctrl-C, SIGKILL) need the stage to be certainly running
# when the signal lands, however fast or slow the machine: with MODELBUILD_TEST_HOLD set to
# "<stage id>=<file>", that stage, its output written to the cache's temp folder but not yet
# committed, creates <file> and waits to be signalled. Only tests set it.
HOLD_ENV = "MODELBUILD_TEST_HOLD"


def _hold_for_tests(stage_id: str) -> None:
    wanted, _, ready = os.environ.get(HOLD_ENV, "").partition("=")
    if not ready or wanted != stage_id:
        return
    Path(ready).touch()
    while True:  # a signal ends the wait: SIGINT as KeyboardInterrupt, SIGKILL the process
        time.sleep(3600)


def describe(outcome: Outcome) -> str:
    """The stage's line in the run's output (rich markup)."""
    if outcome.status == Status.NEEDS:  # any kind, a gate included: its evaluation was not built
        return "[yellow]not built[/yellow] (needs " + "; ".join(outcome.result["needs"]) + ")" \
            if "blocked_by" not in outcome.result else f"[yellow]not built[/yellow] (waits for {outcome.result['blocked_by']})"
    if outcome.stage.kind == "gate":
        return "passed" if outcome.result["passed"] else "[red]FAILED[/red]"
    if outcome.status == Status.SKIPPED:
        return f"skipped ({outcome.result['reason']})"
    if outcome.stage.kind in ("publish", "publish_engine"):
        return outcome.result["status"] + (f" → {outcome.result['path']}" if "path" in outcome.result else "")
    return {Status.CACHED: "cached", Status.BUILT: "done"}.get(outcome.status, outcome.status.value)


def _guarded(stage: Stage, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except StageSkipped:
        raise
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during stage {stage.id}",
            fix="nothing half-written was kept; rerun the same command to resume",
        ) from None
    except StageError as e:
        if e.where is None:  # a tool failed inside the stage: say which stage
            e.where = f"stage {stage.id}"
        raise
    except ModelbuildError:
        raise
    except Exception as e:  # a library failed inside a stage: one line, traceback under debug
        raise StageError(
            f"stage {stage.id} failed: {type(e).__name__}: {e}",
            fix="rerun with MODELBUILD_DEBUG=1 for the traceback",
        ) from e
