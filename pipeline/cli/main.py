"""The app and its error boundary: ModelbuildError → one line on stderr and the family's exit code."""

from __future__ import annotations

import os
import sys

import typer

from pipeline.cli import build, inspect, recipes
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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        # Outside standalone mode click returns typer.Exit's code instead of raising it.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except ModelbuildError as e:
        if os.environ.get("MODELBUILD_DEBUG") == "1":
            raise
        print(f"error: {e.render()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
