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
    for stage in prepared.plan.stages:
        if stage.cached:
            state = "cached" if prepared.store.get(stage.key) else "to build"
        else:
            state = "runs every time (not cached)"
        table.add_row(stage.id, ", ".join(stage.inputs) or "-", stage.key if keys else stage.key[:12] + "…", state)
    Console().print(table)
    typer.echo(f"source: {prepared.plan.source.provenance}")
    typer.echo(f"storage: {prepared.storage}")


def run(
    recipe: RecipeArg,
    cache_dir: CacheDirOpt = None,
    storage: StorageOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Build, evaluate, gate and publish every variant of a recipe (cached stages are reused)."""
    from pipeline.errors import GateFailed
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
    # Wide enough for the table when piped (rich assumes 80 columns off a terminal).
    console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(table)
    for line in published:
        typer.echo(line)
    if failures:
        raise GateFailed(failures)
