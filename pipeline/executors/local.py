"""Run a plan's stages one at a time on this machine, reusing cached outputs (the scheduler,
``pipeline.executors.scheduler``, decides the order and what each stage gets)."""

from __future__ import annotations

from pipeline.cache.durations import Durations
from pipeline.cache.store import CacheStore
from pipeline.executors.scheduler import Outcome, Progress, Report, run_stage, schedule
from pipeline.progress import PlannedStage
from pipeline.stages.base import Stage
from pipeline.stages.context import RunContext, StageInput
from pipeline.stages.status import Status


class LocalExecutor:
    """Every ready stage runs here, in-process, before the next one starts."""

    def __init__(self, ctx: RunContext, store: CacheStore):
        self.ctx = ctx
        self.store = store

    def submit(self, stage: Stage, inputs: dict[str, StageInput], progress: Progress) -> Outcome:
        return run_stage(self.ctx, self.store, stage, inputs, progress)

    def collect(self) -> None:
        return None  # nothing is ever handed off

    def cancel(self) -> None:
        pass  # the running stage was stopped by the interrupt itself


def execute(plan, ctx: RunContext, store: CacheStore) -> Report:
    """Run every stage of ``plan`` (see ``scheduler.schedule``) inside the reporter's span of the
    run: its ETA rests on the cache's record of past build times, which this run's builds then
    extend."""
    history = Durations(store.root)
    hits = {s.id for s in plan.stages if s.cached and store.get(s.key) is not None}
    planned = [PlannedStage(s.id, 0.0 if s.id in hits else history.estimate(s.key, s.kind, s.params), s.id in hits,
                            s.kind) for s in plan.stages]
    report = None
    try:
        with ctx.reporter.run(planned):
            report = schedule(plan, ctx, LocalExecutor(ctx, store))
    except BaseException as e:
        report = getattr(e, "report", None)  # what finished before the failure was timed too
        raise
    finally:
        _record(history, report)
    return report


def _record(history: Durations, report: Report | None) -> None:
    if report is None:
        return
    timed = [o for o in report.outcomes.values() if o.status in (Status.BUILT, Status.RAN)]
    for o in timed:
        history.add(o.stage.key, o.stage.kind, o.stage.params, o.seconds)
    if timed or history.seeded:  # a seeded index is saved, so the entries are scanned only once
        history.save()
