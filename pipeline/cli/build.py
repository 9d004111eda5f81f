"""``plan`` and ``run``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.options import CacheDirOpt, DeviceOpt, RecipeArg, StorageOpt


def register(app: typer.Typer) -> None:
    app.command()(plan)
    app.command()(run)


def plan(
    recipe: RecipeArg,
    cache_dir: CacheDirOpt = None,
    storage: StorageOpt = None,
    keys: Annotated[bool, typer.Option("--keys", help="Show full stage keys.")] = False,
) -> None:
    """Show the stages a recipe becomes, their keys, and which are already cached."""
    from pipeline.orchestrate import prepare
    from pipeline.progress import Reporter

    reporter = Reporter()
    prepared = prepare(recipe, cache_dir=cache_dir, storage=storage, reporter=reporter)
    table = Table(title=f"{prepared.loaded.recipe.name}: {len(prepared.plan.stages)} stages")
    for col in ("stage", "inputs", "key", "state"):
        table.add_column(col)
    from pipeline.hardware import missing

    waiting = []
    for stage in prepared.plan.stages:
        if stage.cached:
            state = "cached" if prepared.store.get(stage.key) else "to build"
            lacking = missing(stage.hints.requires) if state == "to build" else []
            if lacking:
                state = "waiting for a GPU builder"
                waiting.append(f"{stage.id}: waiting for a GPU builder (needs {'; '.join(lacking)})")
        else:
            state = "runs every time (not cached)"
        table.add_row(stage.id, ", ".join(stage.inputs + stage.after) or "-", stage.key if keys else stage.key[:12] + "…", state)
    _console().print(table)
    for line in waiting:
        typer.echo(line)
    typer.echo(f"source: {prepared.plan.source.provenance}")
    typer.echo(f"storage: {prepared.storage}")
    _print_formats(prepared)


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
) -> None:
    """Build, evaluate, gate and publish every variant of a recipe (cached stages are reused)."""
    from pipeline.errors import GateFailed, NeedsHardware
    from pipeline.stages.trtllm_engine import builder_command
    from pipeline.orchestrate import prepare
    from pipeline.orchestrate import run as run_prepared
    from pipeline.progress import Reporter
    from pipeline.stages.gate import failure_lines

    reporter = Reporter()
    prepared = prepare(recipe, cache_dir=cache_dir, storage=storage, reporter=reporter)
    report = run_prepared(prepared, device=device, reporter=reporter)

    baseline = report.outcomes["baseline"].result
    table = Table(title=f"{prepared.loaded.recipe.name} (baseline PPL {baseline['ppl']:.3f}, "
                        f"{baseline['tokens_scored']} tokens)")
    for col in ("variant", "size MB", "PPL", "PPL ratio", "mean KLD", "p99 KLD", "top-1", "gate"):
        table.add_column(col, justify="left" if col in ("variant", "gate") else "right", no_wrap=True)
    failures: list[str] = []
    published: list[str] = []
    for variant in prepared.loaded.recipe.variants:
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
        if outcome.stage.kind == "publish_engine" and outcome.status in ("ran", "cached"):
            pub = outcome.result
            typer.echo(f"{outcome.stage.params['name']}: {pub['status']}" + (f" {pub['path']}" if "path" in pub else ""))
        elif outcome.stage.kind == "trtllm_engine" and outcome.status == "skipped":
            typer.echo(f"{outcome.stage.id}: {outcome.result['reason']}")
    for outcome in report.not_built():
        line = f"{outcome.stage.id}: not built, needs " + "; ".join(outcome.result["needs"])
        if outcome.stage.kind == "trtllm_engine":
            line += f"; {builder_command(prepared.loaded.path, outcome.stage)}"
        typer.echo(line, err=True)
        pending.append(line)
    if failures:
        raise GateFailed(failures)
    if pending:
        raise NeedsHardware([o.stage.id for o in report.not_built()])
