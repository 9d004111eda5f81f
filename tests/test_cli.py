"""The command line as a user meets it: every command's help renders, and none imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def _commands() -> list[str]:
    from pipeline.cli.main import app
    from typer.main import get_command

    return sorted(get_command(app).commands)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_a_help_page(cli, command):
    code, out, err = cli(command, "--help")
    assert code == 0, err
    assert "Usage:" in out


def test_help_does_not_import_torch():
    probe = ("import sys; from pipeline.cli.main import main\n"
             "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
