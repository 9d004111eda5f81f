"""The command line as a user meets it: every command's help renders with its defaults and none
imports torch; `modelbuild RECIPE.yaml` is `run` (several recipes: the worst exit code);
`--version`; shell completion; one --storage rule everywhere; the registry commands under `store`
and still at the top level."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import REPO, one_line, write_recipe

CONSOLE_SCRIPT = Path(sys.executable).with_name("modelbuild")
STORE_COMMANDS = ["list", "show", "select", "pull", "verify", "promote", "rollback", "gc", "reindex", "deploy",
                  "push-hub"]


def _walk(command, path: tuple[str, ...] = ()):
    """``(path, command)`` of every leaf command and group below ``command``."""
    for name, sub in getattr(command, "commands", {}).items():
        yield path + (name,), sub
        yield from _walk(sub, path + (name,))


def _commands() -> list[tuple[str, ...]]:
    from typer.main import get_command

    from pipeline.cli.main import app

    return sorted(path for path, _ in _walk(get_command(app)))


def _command(path: tuple[str, ...]):
    from typer.main import get_command

    from pipeline.cli.main import app

    return dict(_walk(get_command(app)))[path]


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_has_a_help_page(cli, command):
    code, out, err = cli(*command, "--help")
    assert code == 0, err
    assert "Usage:" in out


def test_help_does_not_import_torch():
    probe = ("import sys; from pipeline.cli.main import main\n"
             "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


# --- defaults and help text --------------------------------------------------------------------


def _option_rows(help_text: str) -> dict[str, str]:
    """Each option's row of a rendered help page (wrapped lines joined), by every name it shows."""
    rows: dict[str, str] = {}
    current: list[str] = []
    for line in help_text.splitlines():
        body = line.strip().strip("│").strip()
        if line.lstrip().startswith("│") and body.startswith("-"):
            current = [body]
            for name in body.split("<")[0].split():
                rows[name.rstrip(",")] = current  # type: ignore[assignment]
        elif line.lstrip().startswith("│") and current:
            current.append(body)
        else:
            current = []
    return {name: " ".join(parts) for name, parts in rows.items()}


def _needs_a_default(param) -> bool:
    """Options that can be left out and are not plain off-by-default switches."""
    if param.param_type_name != "option" or param.required or param.name == "help":
        return False
    return not (param.is_flag and not param.secondary_opts and param.default is False)


@pytest.mark.parametrize("command", [c for c in _commands() if not hasattr(_command(c), "commands")], ids=" ".join)
def test_every_option_shows_its_default(cli, command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one row per option where it fits
    code, out, err = cli(*command, "--help")
    assert code == 0, err
    rows = _option_rows(out)
    for param in _command(command).params:
        if _needs_a_default(param):
            row = rows.get(param.opts[0])
            assert row is not None, f"{param.opts[0]} missing from {' '.join(command)} --help:\n{out}"
            # typer's "[default: ...]", or a "(default: ...)" the help text spells out
            assert "default:" in row, f"{' '.join(command)} {param.opts[0]} shows no default: {row}"


def test_the_default_check_can_fail(cli, monkeypatch):
    """An option whose default is None and says nothing about it is caught."""
    import typer
    from typer.main import get_command

    probe = typer.Typer()

    @probe.command()
    def go(where: str | None = typer.Option(None, help="Somewhere.")) -> None:
        pass

    monkeypatch.setenv("COLUMNS", "250")
    from typer.testing import CliRunner

    out = CliRunner().invoke(probe, ["--help"]).output
    [param] = [p for p in get_command(probe).params if p.name == "where"]
    assert _needs_a_default(param) and "default:" not in _option_rows(out)["--where"]


def test_no_help_text_is_lost_to_markup():
    """Help is rendered as rich markup: "[default: x]" or "[@VERSION]" would vanish from the page."""
    from rich.errors import MarkupError
    from rich.text import Text
    from typer.main import get_command

    from pipeline.cli.main import app

    texts = []
    for path, command in _walk(get_command(app)):
        texts.append((" ".join(path), command.help or ""))
        texts += [(f"{' '.join(path)} {p.name}", getattr(p, "help", None) or "") for p in command.params]
    for where, text in texts:
        try:
            shown = Text.from_markup(text).plain
        except MarkupError as e:
            pytest.fail(f"{where}: {e}")
        assert shown == text, f"{where}: help text is read as markup: {text!r} shows as {shown!r}"


# --- modelbuild RECIPE.yaml ---------------------------------------------------------------------


def test_a_recipe_file_runs_like_run_and_list_finds_what_it_published(cli, tiny_model, wikitext, tmp_path, monkeypatch):
    """No --storage, no $MODELBUILD_STORAGE, no publish.root: the run publishes to ./artifacts and
    `list` (and `store list`) without --storage read the same store."""
    monkeypatch.delenv("MODELBUILD_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_model, wikitext)
    code, out, err = cli(recipe, "--cache-dir", tmp_path / "cache", isolated=False)
    assert code == 0, err
    assert "fp8" in out and "pass" in out
    [manifest] = (tmp_path / "artifacts").rglob("manifest.json")
    version = json.loads(manifest.read_text())["version"]
    for command in (["list"], ["store", "list"]):
        code, out, err = cli(*command, isolated=False)
        assert code == 0, err
        assert f"tiny/fp8@{version}" in out
    # `run` is the same command: everything is cached and already published.
    code, _, err = cli("run", recipe, "--cache-dir", tmp_path / "cache", isolated=False)
    assert code == 0, err
    assert "already published" in err


def test_several_recipes_run_in_turn_with_the_worst_exit_code(cli, tiny_model, wikitext, tmp_path, dirs):
    """A gate that fails in the first recipe does not stop the second; the exit code is the gate's;
    one --report-dir gets a folder per recipe (two files named recipe.yaml stay apart)."""
    (tmp_path / "strict").mkdir()
    (tmp_path / "loose").mkdir()
    strict = write_recipe(tmp_path / "strict", tiny_model, wikitext, name="strict", gate="max_kld: 0.0")
    loose = write_recipe(tmp_path / "loose", tiny_model, wikitext, name="loose")
    reports = tmp_path / "reports"
    code, out, err = cli(strict, loose, "--cache-dir", dirs["cache"], "--storage", dirs["storage"],
                         "--report-dir", reports)
    assert code == 3, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(strict) in errors[0] and "gate failed: fp8" in errors[0]
    assert f"2 recipes: {strict} exit 3, {loose} ok" in err
    assert sorted(p.parents[2].name for p in dirs["storage"].rglob("manifest.json")) == ["loose"]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in reports.glob("*/summary.json")}
    assert {k: (v["recipe"]["name"], v["exit_code"]) for k, v in summaries.items()} == {
        "recipe": ("strict", 3), "recipe-2": ("loose", 0)}


def test_run_takes_several_recipes_too(cli, tmp_path):
    missing = [tmp_path / "a.yaml", tmp_path / "b.yml"]
    code, _, err = cli("run", *missing, isolated=False)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert [str(m) in e and "file not found" in e for m, e in zip(missing, errors)] == [True, True]


@pytest.mark.parametrize(("args", "expected"), [
    (["missing.yaml"], "missing.yaml: file not found"),
    (["missing.yaml", "--storage"], "--storage"),
    (["missing.yaml", "--no-such-option"], "No such option: --no-such-option"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_bad_recipe_form_input_is_one_message_exit_2(cli, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(*args, isolated=False)
    assert code == 2
    assert expected in err and "Traceback" not in err


def test_split_args_knows_which_options_take_values():
    from typer.main import get_command

    from pipeline.cli.main import app, split_args

    run = get_command(app).commands["run"]
    assert split_args(run, ["a.yaml", "--storage", "s.yaml", "--locked", "b.yml", "--device=cpu", "--", "-c.yaml"]) \
        == (["a.yaml", "b.yml", "-c.yaml"], ["--storage", "s.yaml", "--locked", "--device=cpu"])


# --- --version ----------------------------------------------------------------------------------


def test_version_prints_modelbuild_and_tool_versions_without_importing_torch():
    probe = ("import sys; from pipeline.cli.main import main\n"
             "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
             "print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "torch not imported"
    shown = dict(line.split(None, 1) for line in lines[:-1])

    from pipeline import __version__
    from pipeline.toolchains import llamacpp

    assert shown["modelbuild"] == __version__
    for dist in ("llmcompressor", "compressed-tensors", "nvidia-modelopt", "torch"):
        assert shown[dist] == metadata.version(dist)
    built = llamacpp.installed_version()
    assert shown["llama.cpp"] == built if built != "not-installed" else shown["llama.cpp"].startswith("not built")


# --- shell completion ---------------------------------------------------------------------------


def _complete(words: str) -> list[str]:
    env = {**os.environ, "_MODELBUILD_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - 1)}
    done = subprocess.run([str(CONSOLE_SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_shell_completion_completes_commands_and_the_recipe_forms_options():
    assert "store" in _complete("modelbuild sto")
    assert _complete("modelbuild store pu") == ["pull", "push-hub"]
    assert "--storage" in _complete("modelbuild recipes/x.yaml --sto")
    assert "--report-dir" in _complete("modelbuild run recipes/x.yaml --rep")


def test_install_completion_writes_the_bash_script(tmp_path):
    # Typed in bash, as a user does: the shell is detected from the calling process (shellingham),
    # so the test must not depend on whatever started pytest (a detached job has no shell above it).
    env = {**os.environ, "HOME": str(tmp_path), "SHELL": "/bin/bash"}
    done = subprocess.run(["bash", "-c", f"'{CONSOLE_SCRIPT}' --install-completion; exit $?"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    scripts = list(tmp_path.rglob("modelbuild*"))
    assert scripts and "_MODELBUILD_COMPLETE" in scripts[0].read_text()


# --- one --storage everywhere -------------------------------------------------------------------


def test_every_storage_option_is_the_same_option():
    from typer.main import get_command

    from pipeline.cli.main import app

    found = {}
    for path, command in _walk(get_command(app)):
        for p in getattr(command, "params", []):
            if "--storage" in getattr(p, "opts", []):
                found[" ".join(path)] = (p.envvar, p.default, p.help, p.show_default)
    assert {"run", "plan", "watch", "report", "list", "verify", "store list", "store deploy"} <= set(found)
    assert len(set(found.values())) == 1, found
    assert next(iter(found.values()))[:2] == ("MODELBUILD_STORAGE", None)


def test_storage_is_the_flag_then_the_variable_then_publish_root_then_artifacts(cli, tiny_model, wikitext,
                                                                                tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MODELBUILD_STORAGE", raising=False)
    bare = write_recipe(tmp_path, tiny_model, wikitext)
    (tmp_path / "rooted").mkdir()
    rooted = write_recipe(tmp_path / "rooted", tiny_model, wikitext, extra=f"publish:\n  root: {tmp_path / 'root'}\n")

    def storage(recipe: Path, *extra: str) -> str:
        code, out, err = cli("plan", recipe, "--cache-dir", tmp_path / "cache", *extra, isolated=False)
        assert code == 0, err
        return next(line for line in out.splitlines() if line.startswith("storage: ")).split(": ", 1)[1]

    assert storage(bare) == str(tmp_path / "artifacts")
    assert storage(rooted) == str(tmp_path / "root")
    monkeypatch.setenv("MODELBUILD_STORAGE", str(tmp_path / "env"))
    assert storage(rooted) == str(tmp_path / "env")
    assert storage(rooted, "--storage", str(tmp_path / "flag")) == str(tmp_path / "flag")
    code, out, err = cli("list", isolated=False)
    assert code == 0 and out.strip() == f"nothing published in {tmp_path / 'env'}", err


# --- modelbuild store ... -----------------------------------------------------------------------


def test_the_store_group_holds_the_registry_commands_and_the_old_names_still_work(cli, tmp_path):
    code, top, _ = cli("--help")
    assert code == 0
    code, group, _ = cli("store", "--help")
    assert code == 0
    listed = _command(("store",)).commands
    assert list(listed) == STORE_COMMANDS
    for name in STORE_COMMANDS:
        assert f" {name} " in group
        assert _command((name,)).hidden, f"top-level {name} should be a hidden alias"
        assert f"│ {name} " not in top
    assert "│ store " in top
    # The alias and the group's command are the same command: same output, same error.
    for args in (["list"], ["show", "m/nope"]):
        results = [cli(*prefix, *args, "--storage", tmp_path / "s", isolated=False) for prefix in ([], ["store"])]
        assert results[0] == results[1]
    code, _, err = cli("store", "show", "m/nope", "--storage", tmp_path / "s", isolated=False)
    assert code == 2 and "nothing published" in one_line(err)
