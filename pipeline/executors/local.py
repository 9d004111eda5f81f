"""Run a plan's stages in dependency order on this machine, reusing cached outputs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache.durations import Durations
from pipeline.cache.store import CacheStore, Entry
from pipeline.errors import Interrupted, ModelbuildError, StageError, StageSkipped
from pipeline.hardware import missing
from pipeline.plan.stage import Stage
from pipeline.progress import PlannedStage
from pipeline.stages import runner
from pipeline.stages.context import RunContext, StageInput


@dataclass(frozen=True)
class Outcome:
    """What happened to one stage.

    Attributes:
        status: ``cached`` (entry reused), ``built`` (ran, now cached), ``ran`` (uncached stage),
            ``needs`` (not run: this machine lacks what the stage requires, or an input was not
            built for that reason; ``result["needs"]`` says what) or ``skipped`` (nothing to do,
            ``result["reason"]``).
    """

    stage: Stage
    status: str
    result: dict[str, Any]
    seconds: float
    entry: Entry | None = None


@dataclass
class Report:
    outcomes: dict[str, Outcome] = field(default_factory=dict)

    def ran(self) -> list[str]:
        """Ids of stages that did work (were not served from the cache)."""
        return [sid for sid, o in self.outcomes.items() if o.status == "built"]

    def not_built(self) -> list[Outcome]:
        """Stages that need hardware this machine lacks (the first of each chain)."""
        return [o for o in self.outcomes.values() if o.status == "needs" and "blocked_by" not in o.result]


def execute(plan, ctx: RunContext, store: CacheStore) -> Report:
    """Run every stage of ``plan`` (see ``_execute``) inside the reporter's span of the run: its
    ETA rests on the cache's record of past build times, which this run's builds then extend."""
    history = Durations(store.root)
    hits = {s.id for s in plan.stages if s.cached and store.get(s.key) is not None}
    planned = [PlannedStage(s.id, 0.0 if s.id in hits else history.estimate(s.key, s.kind, s.params), s.id in hits,
                            s.kind) for s in plan.stages]
    report = None
    try:
        with ctx.reporter.run(planned):
            report = _execute(plan, ctx, store)
    except BaseException as e:
        report = getattr(e, "report", None)  # what finished before the failure was timed too
        raise
    finally:
        _record(history, report)
    return report


def _record(history: Durations, report: Report | None) -> None:
    if report is None:
        return
    timed = [o for o in report.outcomes.values() if o.status in ("built", "ran")]
    for o in timed:
        history.add(o.stage.key, o.stage.kind, o.stage.params, o.seconds)
    if timed or history.seeded:  # a seeded index is saved, so the entries are scanned only once
        history.save()


def _execute(plan, ctx: RunContext, store: CacheStore) -> Report:
    """Run every stage of ``plan``.

    Raises:
        Interrupted: Ctrl-C (the running stage's temp output is removed first).
        StageError: a stage raised something unexpected.
        ModelbuildError: a stage found bad input.

    Whatever is raised carries ``report``: the outcomes of the stages that finished before it
    (variants already gated and published among them), so the run's reports match the store.
    """
    report = Report()
    total = len(plan.stages)
    try:
        for index, stage in enumerate(plan.stages, 1):
            inputs = {
                sid: StageInput(report.outcomes[sid].result, report.outcomes[sid].entry, report.outcomes[sid].status)
                for sid in stage.inputs + stage.after
            }
            outcome = _run_stage(ctx, store, stage, inputs, index, total)
            report.outcomes[stage.id] = outcome
            seconds = outcome.seconds if outcome.status == "built" else None
            ctx.reporter.stage(index, total, stage.id, _describe(outcome), seconds)
    except KeyboardInterrupt:  # between stages (a stage's own interrupt is converted in _guarded)
        error = Interrupted("interrupted between stages",
                            fix="nothing half-written was kept; rerun the same command to resume")
        error.report = report
        raise error from None
    except ModelbuildError as e:
        e.report = report
        raise
    return report


def _run_stage(ctx: RunContext, store: CacheStore, stage: Stage, inputs: dict, index: int, total: int) -> Outcome:
    """One stage: served from the cache, built into it, or (uncached kinds) run."""
    started = time.perf_counter()
    module = runner(stage.kind)
    blocked = next((sid for sid in inputs if inputs[sid].status in ("needs", "skipped")), None)
    if blocked is not None:  # an input was not built: neither is this
        upstream = inputs[blocked]
        return Outcome(stage, upstream.status, {**upstream.result, "blocked_by": blocked}, 0.0)
    try:
        if not stage.cached:
            result = _guarded(stage, lambda: module.run(ctx, stage, inputs))
            return Outcome(stage, "ran", result, time.perf_counter() - started)
        entry = store.get(stage.key)  # built elsewhere (a shared cache) counts, whatever this machine is
        status = "cached"
        if entry is None:
            lacking = missing(stage.hints.requires)
            if lacking:
                return Outcome(stage, "needs", {"needs": lacking}, 0.0)
            ctx.reporter.stage(index, total, stage.id, "running")
            describe = {"stage": stage.id, "kind": stage.kind, "params": stage.params}

            def build(out):
                result = module.run(ctx, stage, inputs, out)
                _hold_for_tests(stage.id)
                return result

            entry = _guarded(stage, lambda: store.put(stage.key, build, describe))
            status = "built"
    except StageSkipped as e:
        return Outcome(stage, "skipped", {"reason": str(e)}, time.perf_counter() - started)
    return Outcome(stage, status, entry.result, time.perf_counter() - started, entry)


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


def _describe(outcome: Outcome) -> str:
    if outcome.stage.kind == "gate":
        return "passed" if outcome.result["passed"] else "[red]FAILED[/red]"
    if outcome.status == "needs":
        return "[yellow]not built[/yellow] (needs " + "; ".join(outcome.result["needs"]) + ")" \
            if "blocked_by" not in outcome.result else f"[yellow]not built[/yellow] (waits for {outcome.result['blocked_by']})"
    if outcome.status == "skipped":
        return f"skipped ({outcome.result['reason']})"
    if outcome.stage.kind in ("publish", "publish_engine"):
        return outcome.result["status"] + (f" → {outcome.result['path']}" if "path" in outcome.result else "")
    return {"cached": "cached", "built": "done"}.get(outcome.status, outcome.status)


def _guarded(stage: Stage, call):
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
