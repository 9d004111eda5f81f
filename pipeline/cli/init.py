"""``init``: write a commented starter recipe for a model (never imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command()(init)


def init(
    model: Annotated[str, typer.Argument(help="A Hub id (owner/name), a checkpoint folder or a .gguf file.",
                                         show_default=False, metavar="MODEL")],
    engines: Annotated[list[str] | None, typer.Option(
        "--engines", help="Engines to make variants for, comma-separated or repeated: vllm, trtllm, llamacpp "
                          "(default: all three).", show_default=False)] = None,
    gpu: Annotated[list[str] | None, typer.Option(
        "--gpu", help="Deployment target GPU, comma-separated or repeated (H100, L40S, B200, A100, T4, ...) "
                      "(default: L40S, H100, B200, the demo's).", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Recipe file to write (default: ./<name>.yaml).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output file if it exists.")] = False,
    name: Annotated[str | None, typer.Option(
        "--name", help="Recipe name (default: from the model's name).", show_default=False)] = None,
    revision: Annotated[str, typer.Option("--revision", help="Hub models: branch, tag or commit.")] = "main",
    eval_text: Annotated[Path | None, typer.Option(
        "--eval-text", help="Held-out UTF-8 text every variant is scored on (default: the repo's "
                            "evals/data/wikitext-2/test.txt).", show_default=False)] = None,
    calibration_text: Annotated[Path | None, typer.Option(
        "--calibration-text", help="UTF-8 text calibrated schemes observe (default: the repo's "
                                   "evals/data/wikitext-2/valid.txt).", show_default=False)] = None,
) -> None:
    """Write a starter recipe for MODEL: the standard variants per engine that its shapes and the
    target GPUs allow, the demo's gates, eval and calibration settings; it passes `validate`.

    Offline (HF_HUB_OFFLINE=1) a Hub model's config is read from the local Hub cache."""
    from pipeline.starter import write_starter

    written = write_starter(model, output, engines=engines, gpus=gpu, force=force, name=name, revision=revision,
                            eval_text=eval_text, calibration_text=calibration_text)
    typer.echo(written.summary(), err=True)
