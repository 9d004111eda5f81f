"""``plan`` and ``run``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.options import CacheDirOpt, DeviceOpt, RecipeArg, StorageOpt


def register(app: typer.Typer) -> None:
    app.command()(plan)
    app.command()(run)
    app.command()(lock)
    app.command()(watch)


def watch(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files (YAML).", show_default=False, metavar="RECIPE...")],
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Run every stale recipe (then refresh its lock).")] = False,
    cache_dir: CacheDirOpt = None,
    storage: StorageOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Report which recipes' sources or data moved since their lock; exit 0 nothing new, 10 stale,
    11 rebuilt, 12 could not check, 13 a rebuild failed."""
    import json

    from pipeline.run import watch as watching

    checks = [watching.check(r) for r in recipes]
    rebuilt, failed, results = 0, 0, {}
    for c in checks:
        if c.status == "stale" and rebuild:
            ok, results[str(c.recipe)] = watching.rebuild(c.recipe, cache_dir=cache_dir, storage=storage)
            rebuilt, failed = rebuilt + ok, failed + (not ok)
    if json_:
        typer.echo(json.dumps([{**c.as_dict(), "rebuild": results.get(str(c.recipe))} for c in checks], indent=2))
    else:
        for c in checks:
            detail = "; ".join(c.changes) if c.changes else (c.reason or "")
            line = {"current": "current", "stale": "stale", "new release": "new release",
                    "unknown": "could not check"}[c.status]
            typer.echo(f"{line}: {c.recipe}" + (f" ({detail})" if detail else "")
                       + (f" → {results[str(c.recipe)]}" if str(c.recipe) in results else ""))
    raise typer.Exit(watching.exit_code(checks, rebuilt, failed))


def lock(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files (YAML).", show_default=False, metavar="RECIPE...")],
    cache_dir: CacheDirOpt = None,
) -> None:
    """Write or refresh each recipe's lock file: resolved source, data digests, tool versions."""
    from pipeline.progress import Reporter
    from pipeline.run import lockfile
    from pipeline.run.orchestrate import prepare

    for recipe in recipes:
        prepared = prepare(recipe, cache_dir=cache_dir, storage=None, reporter=Reporter())
        path, changed = lockfile.write(prepared, acknowledge_releases=True)
        typer.echo(f"{path}: {'written' if changed else 'unchanged'}")


def plan(
    recipe: RecipeArg,
    cache_dir: CacheDirOpt = None,
    storage: StorageOpt = None,
    device: DeviceOpt = "auto",
    keys: Annotated[bool, typer.Option("--keys", help="Show full stage keys.")] = False,
) -> None:
    """Show the stages a recipe becomes, their keys, and which are already cached."""
    from pipeline.progress import Reporter
    from pipeline.run.orchestrate import prepare

    reporter = Reporter()
    prepared = prepare(recipe, cache_dir=cache_dir, storage=storage, reporter=reporter, device=device)
    table = Table(title=f"{prepared.loaded.recipe.name}: {len(prepared.plan.stages)} stages")
    for col in ("stage", "inputs", "key", "state"):
        table.add_column(col)
    from pipeline.hardware import missing
    from pipeline.memory import scored_window, shortfall

    waiting = []
    checkpoint = _planned_checkpoint(prepared)
    for stage in prepared.plan.stages:
        if stage.cached:
            state = "cached" if prepared.store.get(stage.key) else "to build"
            lacking = missing(stage.hints.requires) if state == "to build" else []
            if lacking:
                state = "waiting for a GPU builder"
                waiting.append(f"{stage.id}: waiting for a GPU builder (needs {'; '.join(lacking)})")
            short = (shortfall(stage.hints.memory_model, checkpoint, stage.id, seq_len=scored_window(stage))
                     if state == "to build" else None)
            if short:
                state = "needs more memory"
                waiting.append(f"{stage.id}: will not start here, needs {short}")
        else:
            state = "runs every time (not cached)"
        table.add_row(stage.id, ", ".join(stage.inputs + stage.after) or "-", stage.key if keys else stage.key[:12] + "…", state)
    _console().print(table)
    for line in waiting:
        typer.echo(line)
    typer.echo(f"source: {prepared.plan.source.provenance}")
    typer.echo(f"storage: {prepared.storage}")
    typer.echo(f"device: {prepared.device} (baseline, quantize and evaluate keys name it when it is a GPU)")
    _print_formats(prepared)


def _planned_checkpoint(prepared) -> Path | None:
    """The checkpoint whose tensor sizes the memory models read at plan time: the fetched one when
    cached, else a local source's folder (the same tensors; a Hub or GGUF source is sized once
    fetched, before each stage starts)."""
    fetch = next((s for s in prepared.plan.stages if s.kind == "fetch"), None)
    entry = prepared.store.get(fetch.key) if fetch is not None else None
    if entry is not None:
        return entry.data
    source = prepared.loaded.recipe.source
    return Path(source.path) if source.kind == "local" else None


def _print_formats(prepared) -> None:
    """What each variant will be and who can load it (the plan promises no other engine)."""
    from pipeline.backends import get_backend

    table = Table(title="variants: format, engines that load it, GPUs")
    for col in ("variant", "format", "scheme", "engines", "GPU needs", "serving profiles"):
        table.add_column(col)
    publish = prepared.plan.by_id()
    for variant in prepared.loaded.recipe.variants:
        backend = get_backend(variant.backend)
        info = backend.describe(variant)
        profiles = publish[f"publish/{variant.name}"].params.get("serving_profiles", [])
        table.add_row(variant.name, info.format, info.scheme, ", ".join(info.engines), backend.gpu_requirement(variant),
                      ", ".join(f"{p['name']} ({'/'.join(p['gpus']) or 'CPU'})" for p in profiles) or "-")
    _console().print(table)


def _console() -> Console:
    # Wide enough for the tables when piped (rich assumes 80 columns off a terminal).
    return Console() if sys.stdout.isatty() else Console(width=160)


def run(
    recipe: RecipeArg,
    cache_dir: CacheDirOpt = None,
    storage: StorageOpt = None,
    device: DeviceOpt = "auto",
    locked: Annotated[bool, typer.Option(
        "--locked", help="Refuse to run when the source, data, recipe or tools differ from <recipe>.lock.json.",
    )] = False,
    report_dir: Annotated[Path | None, typer.Option(
        "--report-dir", help="Where summary.json, junit.xml and summary.md go.",
        show_default="$MODELBUILD_REPORTS, else reports/<recipe name>",
    )] = None,
    executor: Annotated[str, typer.Option(
        "--executor", help="local (this machine) or ray (stages as Ray tasks across a cluster sharing the cache).",
        case_sensitive=False)] = "local",
    address: Annotated[str | None, typer.Option(
        "--address", envvar="RAY_ADDRESS", help="The Ray cluster's HOST:PORT.", show_default="start Ray on this machine",
    )] = None,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Print no progress: warnings and errors only (the results still go to stdout).",
    )] = False,
    json_progress: Annotated[bool, typer.Option(
        "--json-progress", help="Progress as one JSON object per line on stderr (for CI dashboards).",
    )] = False,
) -> None:
    """Build, evaluate, gate and publish every variant of a recipe (cached stages are reused).

    Every run that starts writes summary.json, junit.xml (one test case per variant's gate) and
    summary.md, also when a gate fails or a stage stops it."""
    import time

    from pipeline.errors import GateFailed, ModelbuildError, NeedsHardware
    from pipeline.progress import Reporter
    from pipeline.run.orchestrate import EXECUTORS, prepare
    from pipeline.run.orchestrate import run as run_prepared
    from pipeline.run.report import default_folder, write_for_run
    from pipeline.stages.gate import failure_lines
    from pipeline.stages.status import Status
    from pipeline.stages.trtllm_engine import builder_command

    if executor.lower() not in EXECUTORS:
        from pipeline.errors import InputError

        raise InputError(f"unknown executor {executor!r}", where="--executor", fix=f"use {' or '.join(EXECUTORS)}")
    # Off a terminal the reporter prints plain lines and a heartbeat every $MODELBUILD_PROGRESS_INTERVAL s.
    reporter = Reporter(mode="json" if json_progress else "quiet" if quiet else None)
    prepared = prepare(recipe, cache_dir=cache_dir, storage=storage, reporter=reporter, device=device,
                       executor=executor.lower())
    folder = report_dir or default_folder(prepared.loaded.recipe.name)
    started = time.time()

    def write_reports(report, exit_code: int, error: str | None, *, stopped: bool = False) -> None:
        paths = write_for_run(folder, prepared, report, exit_code=exit_code, error=error, seconds=time.time() - started)
        if not stopped:  # a stopped run's error stays the one line it prints
            typer.echo(f"reports: {paths['json']}, {paths['junit']}, {paths['markdown']}", err=True)

    try:
        report = run_prepared(prepared, reporter=reporter, locked=locked, address=address)
    except ModelbuildError as e:
        # The executor attaches what finished before the failure: variants already published are
        # reported published, with their metrics (the reports match the store).
        try:
            write_reports(getattr(e, "report", None), e.exit_code, e.render(), stopped=True)
        except ModelbuildError as unwritable:  # the run's own error is the one to report
            reporter.warn(unwritable.render())
        raise

    baseline = report.outcomes["baseline"]
    measured = "" if baseline.status == Status.NEEDS else (
        f" (baseline PPL {baseline.result['ppl']:.3f}, {baseline.result['tokens_scored']} tokens)")
    table = Table(title=f"{prepared.loaded.recipe.name}{measured}")
    for col in ("variant", "size MB", "PPL", "PPL ratio", "mean KLD", "p99 KLD", "top-1", "gate"):
        table.add_column(col, justify="left" if col in ("variant", "gate") else "right", no_wrap=True)
    failures: list[str] = []
    published: list[str] = []
    for variant in prepared.loaded.recipe.variants:
        if report.outcomes[f"gate/{variant.name}"].status == Status.NEEDS:  # listed below with what it needs
            table.add_row(variant.name, *["-"] * 6, "not built")
            continue
        quant = report.outcomes[f"quantize/{variant.name}"].result
        m = report.outcomes[f"evaluate/{variant.name}"].result["metrics"]
        gate = report.outcomes[f"gate/{variant.name}"].result
        pub = report.outcomes[f"publish/{variant.name}"].result
        failures += failure_lines(variant.name, gate)
        table.add_row(
            variant.name,
            f"{quant['size_bytes'] / 1e6:.1f}",
            f"{m['ppl']:.3f}",
            f"{m['ppl_ratio']:.4f}",
            f"{m['mean_kld']:.4f}",
            f"{m['p99_kld']:.4f}",
            f"{m['top1']:.3f}",
            "pass" if gate["passed"] else "FAIL",
        )
        published.append(f"{variant.name}: {pub['status']}" + (f" {pub['path']}" if "path" in pub else ""))
    _console().print(table)
    for line in published:
        typer.echo(line)
    pending = []
    for outcome in report.outcomes.values():
        if outcome.stage.kind == "publish_engine" and outcome.status in (Status.RAN, Status.CACHED):
            pub = outcome.result
            typer.echo(f"{outcome.stage.params['name']}: {pub['status']}" + (f" {pub['path']}" if "path" in pub else ""))
        elif outcome.stage.kind == "trtllm_engine" and outcome.status == Status.SKIPPED:
            typer.echo(f"{outcome.stage.id}: {outcome.result['reason']}")
    for outcome in report.not_built():
        line = f"{outcome.stage.id}: not built, needs " + "; ".join(outcome.result["needs"])
        if outcome.stage.kind == "trtllm_engine":
            line += f"; {builder_command(prepared.loaded.path, outcome.stage)}"
        typer.echo(line, err=True)
        pending.append(line)
    outcome_error = GateFailed(failures) if failures else (
        NeedsHardware([o.stage.id for o in report.not_built()]) if pending else None)
    write_reports(report, outcome_error.exit_code if outcome_error else 0,
                  outcome_error.render() if outcome_error else None)
    if outcome_error is not None:
        raise outcome_error
