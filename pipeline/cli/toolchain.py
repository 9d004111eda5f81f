"""``toolchain``: build and show the tools that are compiled rather than pip-installed."""

from __future__ import annotations

from typing import Annotated

import typer

toolchain_app = typer.Typer(help="Build or show llama.cpp (GGUF variants need it).", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(toolchain_app, name="toolchain")


@toolchain_app.command()
def install(
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache",
        help="Reuse (or fill) the per-user build cache, ${XDG_CACHE_HOME:-~/.cache}/modelbuild/toolchains "
             "(MODELBUILD_TOOLCHAIN_CACHE; 'off' disables it); --no-cache builds inside the environment.")] = True,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Parallel compile jobs.",
                                             show_default="the CPUs available")] = None,
    cuda: Annotated[bool, typer.Option(
        "--cuda", help="Build with llama.cpp's CUDA backend (GPU builders; needs the CUDA toolkit's nvcc): "
                       "importance matrices and GGUF evaluation then run on the GPU under --device cuda.")] = False,
) -> None:
    """Build llama.cpp at the pinned version, or reuse this machine's cached build (a rerun returns at once)."""
    from pipeline.toolchains import llamacpp

    llamacpp.install(log=lambda line: typer.echo(line, err=True), jobs=jobs, cache=cache, cuda=cuda)


@toolchain_app.command()
def show() -> None:
    """Where the toolchain is and which llama.cpp it is."""
    from pipeline.toolchains import llamacpp

    chain = llamacpp.find()
    where = f"{chain.root} -> {chain.root.resolve()}" if chain.root.is_symlink() else str(chain.root)
    typer.echo(f"llama.cpp {chain.commit} ({chain.version}) in {where}")
