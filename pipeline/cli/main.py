"""The app and its error boundary: ModelbuildError → one line on stderr and the family's exit code."""

from __future__ import annotations

import os
import sys

import typer

from pipeline.cli import build, inspect, recipes, registry, report, toolchain
from pipeline.errors import ModelbuildError

app = typer.Typer(
    name="modelbuild",
    help="Recipe-driven quantization: build variants of a model, gate them on measured quality, publish.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipes.register(app)
build.register(app)
inspect.register(app)
registry.register(app)
report.register(app)
toolchain.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Typer handles usage errors (exit 2 with its own message) and ``typer.Exit``; everything
    modelbuild raises on purpose is caught here and printed as one line.
    """
    try:
        app(args=argv, standalone_mode=True)
    except ModelbuildError as e:
        if os.environ.get("MODELBUILD_DEBUG") == "1":
            raise
        print(f"error: {e.render()}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
