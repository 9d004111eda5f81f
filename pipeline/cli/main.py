"""The app and its error boundary: ModelbuildError → one line on stderr and the family's exit code.

Also the top level's own conventions: ``modelbuild RECIPE.yaml [RECIPE.yaml ...] [run options]``
is ``modelbuild run`` (the form CI systems call), several recipes run one after another with the
worst exit code, and ``--version`` prints the versions of modelbuild and the tools its builds
depend on.
"""

from __future__ import annotations

import itertools
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from pipeline.cli import build, init, recipes, registry, report, toolchain
from pipeline.errors import Interrupted, ModelbuildError, redact

RECIPE_SUFFIXES = (".yaml", ".yml")

# What `--version` lists: the distributions whose versions change what a build produces (the
# quantizers, the exporters' format library, the framework), read from their metadata.
VERSIONED = ("llmcompressor", "compressed-tensors", "nvidia-modelopt", "transformers", "torch")


def _is_recipe(arg: str) -> bool:
    return not arg.startswith("-") and arg.lower().endswith(RECIPE_SUFFIXES)


# Typer's commands and contexts are click's (recent typer releases vendor click): only attributes
# click documents are used here, and click is never imported.


def _takes_value(command: Any) -> set[str]:
    """The option names of ``command`` that consume the next argument as their value."""
    return {name for p in command.params if p.param_type_name == "option" and not p.is_flag and not p.count
            for name in p.opts + p.secondary_opts}


def split_args(command: Any, args: list[str]) -> tuple[list[str], list[str]]:
    """``(positional arguments, options with their values)`` of ``args``, as ``command`` parses them."""
    valued = _takes_value(command)
    positional: list[str] = []
    options: list[str] = []
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            positional += rest
        elif arg.startswith("-") and arg != "-":
            options.append(arg)
            if "=" not in arg and arg in valued:
                options += itertools.islice(rest, 1)
        else:
            positional.append(arg)
    return positional, options


def _report_dirs(recipes_: list[str], base: str | None) -> list[str | None]:
    """One report folder per recipe under ``base`` (named after the file, made unique), so that
    several recipes with one --report-dir or $MODELBUILD_REPORTS do not overwrite each other's
    summary.json and junit.xml; ``None`` each when ``base`` is unset (each run's default,
    reports/<recipe name>, is already its own)."""
    if base is None:
        return [None] * len(recipes_)
    seen: dict[str, int] = {}
    out: list[str | None] = []
    for recipe in recipes_:
        stem = Path(recipe).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(str(Path(base) / (stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")))
    return out


class EachRecipe(TyperCommand):
    """``run`` once per recipe with the same options; exits with the worst (highest) exit code.

    Every recipe is attempted, as CI wants to know about all of them; Ctrl-C stops at once.
    """

    def __init__(self, run: Any, recipes_: list[str], options: list[str]):
        super().__init__(name="run", add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
        self.run, self.recipes, self.options = run, recipes_, options

    def _per_recipe_options(self) -> list[list[str]]:
        report_opt = next((p for p in self.run.params if p.name == "report_dir"), None)
        if report_opt is None:
            return [self.options] * len(self.recipes)
        names = set(report_opt.opts)
        kept, base = [], os.environ.get("MODELBUILD_REPORTS") or None
        rest = iter(self.options)
        for arg in rest:
            name, eq, value = arg.partition("=")
            if name in names:
                base = value if eq else next(rest, base)
            else:
                kept.append(arg)
        return [kept + ([report_opt.opts[0], folder] if folder else [])
                for folder in _report_dirs(self.recipes, base)]

    def invoke(self, ctx: Any) -> None:
        worst, outcomes = 0, []
        for i, (recipe, options) in enumerate(zip(self.recipes, self._per_recipe_options()), 1):
            print(f"recipe {i}/{len(self.recipes)}: {recipe}", file=sys.stderr)
            try:
                with self.run.make_context("run", [recipe, *options], parent=ctx.parent) as sub:
                    self.run.invoke(sub)
                code = 0
            except typer.Exit as e:
                code = e.exit_code
            except ModelbuildError as e:
                if isinstance(e, Interrupted):
                    raise
                if os.environ.get("MODELBUILD_DEBUG") == "1":  # as main() does: the traceback, same exit code
                    traceback.print_exc()
                _print_error(e, recipe)
                code = e.exit_code
            except Exception as e:  # a bug in one recipe's run: one line, exit 1, the others still run
                if os.environ.get("MODELBUILD_DEBUG") == "1":
                    traceback.print_exc()
                print(f"error: {recipe}: internal error: {redact(' '.join(f'{type(e).__name__}: {e}'.split()))[:500]}",
                      file=sys.stderr)
                code = 1
            worst = max(worst, code)
            outcomes.append(f"{recipe} {'ok' if code == 0 else f'exit {code}'}")
        print(f"{len(self.recipes)} recipes: " + ", ".join(outcomes), file=sys.stderr)
        if worst:
            ctx.exit(worst)


class ModelbuildGroup(TyperGroup):
    """The top-level group: a first argument that is a recipe file rather than a command runs it."""

    def resolve_command(self, ctx: Any, args: list[str]):
        if args and self.get_command(ctx, args[0]) is None and _is_recipe(args[0]):
            name, cmd, rest = "run", self.get_command(ctx, "run"), args
        else:
            name, cmd, rest = super().resolve_command(ctx, args)
        if name == "run" and not ctx.resilient_parsing:  # completion wants run's own options
            recipes_, options = split_args(cmd, rest)
            if len(recipes_) > 1 and not any(o in ("--help", "-h") for o in options):
                return name, EachRecipe(cmd, recipes_, options), rest
        return name, cmd, rest


def versions() -> list[tuple[str, str]]:
    """``(name, version)`` of modelbuild, the libraries in ``VERSIONED`` and the llama.cpp build,
    from package metadata and the toolchain's stamp file: nothing heavy is imported."""
    from importlib import metadata

    from pipeline import __version__
    from pipeline.toolchains import llamacpp

    out = [("modelbuild", __version__)]
    for dist in VERSIONED:
        try:
            out.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            out.append((dist, "not installed"))
    built = llamacpp.installed_version()
    out.append(("llama.cpp", "not built (modelbuild toolchain install)" if built == "not-installed" else built))
    return out


def _print_versions(value: bool) -> None:
    if value:
        width = max(len(name) for name, _ in versions())
        for name, version in versions():
            typer.echo(f"{name:<{width}}  {version}")
        raise typer.Exit()


app = typer.Typer(
    name="modelbuild",
    cls=ModelbuildGroup,
    help="Recipe-driven quantization: build variants of a model, gate them on measured quality, publish.\n\n"
         "`modelbuild RECIPE.yaml [RECIPE.yaml ...] [OPTIONS]` is `modelbuild run` on each recipe in turn "
         "(run's options apply to all of them; the exit code is the worst).",
    subcommand_metavar="RECIPE.yaml... | COMMAND [ARGS]...",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _top(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_versions, is_eager=True,
        help="Print the versions of modelbuild, llm-compressor, compressed-tensors, ModelOpt, transformers, "
             "torch and the llama.cpp build, and exit.")] = False,
) -> None:
    """Holds the top-level options; the commands do the work (and ``--version`` its callback)."""


recipes.register(app)
init.register(app)
build.register(app)
registry.register(app)
report.register(app)
toolchain.register(app)


def _print_error(e: ModelbuildError, recipe: str | None = None) -> None:
    """The one line of a stopped command; with several recipes, naming the recipe unless the
    message already does (a recipe error starts with its file)."""
    text = e.render()
    print(f"error: {recipe}: {text}" if recipe and recipe not in text else f"error: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    Typer handles usage errors (exit 2 with its own message) and ``typer.Exit``; everything
    modelbuild raises on purpose is caught here and printed as one line.
    """
    debug = os.environ.get("MODELBUILD_DEBUG") == "1"
    try:
        app(args=argv, standalone_mode=True)
    except ModelbuildError as e:
        # The debug switch adds the traceback; it never changes the exit code a script sees.
        if debug:
            traceback.print_exc()
        _print_error(e)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug, not bad input: still one line (exit 1), the traceback under debug
        if debug:
            traceback.print_exc()
        text = redact(" ".join(f"{type(e).__name__}: {e}".split()))
        print(f"error: internal error: {text[:500]} (a bug in modelbuild: rerun with MODELBUILD_DEBUG=1 "
              "for the traceback and report it)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
