"""The README as a front door and the documentation site: the first screen holds what the tool is,
the two commands, a recipe that loads and the command table with exit codes; every relative link
of the README names a file that exists; the MkDocs site builds with --strict (broken links and
anchors fail it), as .ci/run builds it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text()
# The README's test command: the fast tests on two workers, then the slow ones alone.
TEST_COMMAND = '.venv/bin/python -m pytest -n 2 -m "not slow" && .venv/bin/python -m pytest -m slow'
SCREEN = 40


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def test_the_first_screen_has_the_commands_a_recipe_and_the_command_table():
    screen = "\n".join(README.splitlines()[:SCREEN])
    [commands] = _blocks(screen, "bash")
    assert "bash .ci/setup && .venv/bin/modelbuild recipes/smollm2-135m-instruct.yaml" in commands
    assert f"bash .ci/setup && {TEST_COMMAND}" in commands
    assert _blocks(screen, "yaml"), "no recipe on the first screen"
    assert "| command |" in screen and "Exit codes" in screen


def test_the_exit_codes_are_the_errors_ones():
    from pipeline import errors

    screen = "\n".join(README.splitlines()[:SCREEN])
    codes = {cls.exit_code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.ModelbuildError)}
    paragraph = screen.split("Exit codes", 1)[1].split("\n\n")[0]
    stated = {int(n) for n in re.findall(r"(?:^|· |: )(\d+) ", paragraph, flags=re.M)}
    assert codes <= stated, codes - stated


def test_the_readme_recipe_loads(tmp_path):
    from pipeline.recipe.load import load_recipe

    [recipe] = _blocks(README, "yaml")[:1]
    path = tmp_path / "recipes" / "readme.yaml"
    path.parent.mkdir()
    path.write_text(recipe)
    loaded = load_recipe(path)
    assert [v.name for v in loaded.recipe.variants] == ["fp8-dynamic", "gguf-q4_k_m"]
    # where the recipe would live (recipes/), its data paths name the repository's copy of the text
    for rel in re.findall(r"(?:path|corpus): (\.\./[^,}\s]+)", recipe):
        assert (REPO / "recipes" / rel).resolve().is_file(), rel


def test_every_relative_link_of_the_readme_exists():
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        assert (REPO / target.split("#")[0]).exists(), target


def test_the_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(tmp_path / "site"), "--config-file", str(REPO / "mkdocs.yml")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "environment" / "index.html").is_file()  # what pyproject.toml links to


def test_pyproject_links_only_to_docs_that_exist():
    for rel in re.findall(r"docs/[\w./-]+\.md", (REPO / "pyproject.toml").read_text()):
        assert (REPO / rel).is_file(), rel


def test_a_broken_link_fails_the_docs_build(tmp_path):
    pytest.importorskip("mkdocs")
    import shutil

    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    for rel in ("evals/README.md", "benchmarks/README.md", "deploy/README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    (tmp_path / "docs" / "tests.md").write_text((REPO / "docs" / "tests.md").read_text() + "\n[gone](nope.md)\n")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 1 and "nope.md" in out.stderr
