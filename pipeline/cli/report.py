"""``report``: a model's tradeoff report (Markdown + self-contained HTML with Pareto plots and
recommendations) from what is published in a store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.options import StorageOpt, storage_url


def register(app: typer.Typer) -> None:
    app.command()(report)


def _target(text: str):
    """``ENGINE:GPU[:MAX_GB[:MAX_KLD]]`` → Target (validated like the recipe's report.targets)."""
    from pydantic import ValidationError

    from pipeline import engines
    from pipeline.errors import InputError
    from pipeline.recipe.schema import ReportTarget
    from pipeline.report.recommend import Target

    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        raise InputError(f"target {text!r} is not ENGINE:GPU[:MAX_GB[:MAX_KLD]]", where="--target",
                         fix="e.g. vllm:H100, llamacpp:cpu:0.2 or vllm:L40S::0.05")
    fields = dict(zip(("engine", "gpu", "max_gb", "max_kld"), parts))
    try:
        t = ReportTarget(**{k: v for k, v in fields.items() if v != ""})
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"target {text!r}: {err['msg']}", where="--target",
                         fix=f"ENGINE is {engines.either(engines.IDS)}; GPU a known GPU or cpu") from None
    return Target(t.engine, t.gpu, t.max_gb, t.max_kld)


def report(
    subject: Annotated[str, typer.Argument(help="A recipe file, or a model name as published.", show_default=False,
                                           metavar="MODEL|RECIPE")],
    storage: StorageOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder to write.",
                                             show_default="reports/<model>/tradeoff")] = None,
    target: Annotated[list[str] | None, typer.Option(
        "--target", help="ENGINE:GPU[:MAX_GB[:MAX_KLD]] to recommend for (repeatable).",
        show_default="the recipe's report.targets, else each engine on each recipe GPU and llama.cpp on CPU")] = None,
) -> None:
    """Write a model's tradeoff report: per variant engine, format, bits, size, PPL, KLD, top-1,
    measured speed, gate and minimum GPU; Pareto plots; a recommendation per target."""
    from pipeline.recipe.load import load_recipe
    from pipeline.recipe.schema import FAST_MAX_KLD
    from pipeline.report.build import build_report, write_report
    from pipeline.report.recommend import Target
    from pipeline.run.orchestrate import storage_root
    from pipeline.storage.location import check_name, open_storage

    targets = [_target(t) for t in target] if target else None
    gpus: list[str] = []
    fast_max_kld = FAST_MAX_KLD
    if subject.endswith((".yaml", ".yml")) or Path(subject).is_file():
        loaded = load_recipe(subject)
        recipe = loaded.recipe
        model = recipe.model_name
        url = storage_root(loaded, storage)
        if targets is None and recipe.report.targets:
            targets = [Target(t.engine, t.gpu, t.max_gb, t.max_kld) for t in recipe.report.targets]
        gpus = [t.gpu for t in recipe.targets]
        fast_max_kld = recipe.report.fast_max_kld
    else:
        model = subject
        check_name(model, "model")
        url = storage_url(storage)
    rep = build_report(open_storage(url), model, targets, gpus, fast_max_kld)
    written = write_report(rep, out or Path("reports") / model / "tradeoff")
    typer.echo(f"report of {len(rep.rows)} variant(s) of {model}:")
    for path in written.values():
        typer.echo(f"  {path}")
    for r in rep.recommendations:
        typer.echo(f"  {r.target.label}: {r.variant or 'none'}" + (f" (fastest: {r.fastest})" if r.fastest else ""))
