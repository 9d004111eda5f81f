"""``toolchain``: build and show the tools that are compiled rather than pip-installed."""

from __future__ import annotations

import typer

toolchain_app = typer.Typer(help="Build or show llama.cpp (GGUF variants need it).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(toolchain_app, name="toolchain")


@toolchain_app.command()
def install() -> None:
    """Build llama.cpp at the pinned version (once per environment; a rerun returns at once)."""
    from pipeline.toolchains import llamacpp

    llamacpp.install(log=lambda line: typer.echo(line, err=True))


@toolchain_app.command()
def show() -> None:
    """Where the toolchain is and which llama.cpp it is."""
    from pipeline.toolchains import llamacpp

    chain = llamacpp.find()
    typer.echo(f"llama.cpp {chain.commit} ({chain.version}) in {chain.root}")
