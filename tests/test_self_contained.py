"""The repository is self-contained: a copy of it with nothing beside it validates and plans every
shipped recipe with its own code and its own data; no recipe, test, CI file or benchmark reaches
outside it; and the shipped WikiText-2 files are the ones their README names."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, WIKITEXT

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# What reaching outside looks like: the data folder that used to sit beside the repository, or a
# path built from the repository's parent.
OUTSIDE = re.compile(r"shared\W+data|/work/shared|REPO\.parent")
CHECKED = ("recipes", "tests", ".ci", ".github", "benchmarks")

# Runs modelbuild in-process after checking that the package imported is the copy's own, not the
# editable install of the working tree.
ENTRY = """\
import sys
from pathlib import Path
import pipeline
here = Path(sys.argv[1]).resolve()
assert Path(pipeline.__file__).resolve().is_relative_to(here), f"pipeline imported from {pipeline.__file__}"
from pipeline.cli.main import main
main(sys.argv[2:])
"""


def _repository_files() -> list[str]:
    """What a clone of the current tree holds: tracked files and new ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True, timeout=120).stdout.decode()
    return sorted({f for f in listed.split("\0") if f and (REPO / f).is_file()})


@pytest.fixture(scope="module")
def copy(tmp_path_factory) -> Path:
    """The repository's files in a folder of their own (its parent holds nothing else)."""
    root = tmp_path_factory.mktemp("alone") / "modelbuild"
    for rel in _repository_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    assert [p.name for p in root.parent.iterdir()] == ["modelbuild"]
    return root


def _modelbuild(copy: Path, *args: str | Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELBUILD_") and k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", ENTRY, str(copy), *map(str, args)], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=900)


def test_the_copy_holds_the_data():
    files = _repository_files()
    assert {"evals/data/wikitext-2/test.txt", "evals/data/wikitext-2/valid.txt",
            "evals/data/wikitext-2/README.md"} <= set(files)


def test_a_copy_alone_validates_every_recipe_with_its_own_code(copy):
    done = _modelbuild(copy, "validate", *(f"recipes/{r.name}" for r in RECIPES))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ok: ") == len(RECIPES)


@pytest.mark.parametrize("recipe", [r.name for r in RECIPES])
def test_a_copy_alone_plans_every_recipe_with_its_own_data(copy, recipe, tmp_path_factory):
    cache, store = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("store")
    done = _modelbuild(copy, "plan", f"recipes/{recipe}", "--cache-dir", cache, "--storage", store)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stages" in done.stdout


def test_the_copy_check_can_fail(copy, tmp_path):
    """A recipe pointing beside the repository does not plan in the copy."""
    outside = copy / "recipes" / "outside.yaml"
    outside.write_text((copy / "recipes" / RECIPES[0].name).read_text().replace(
        "../evals/data/wikitext-2/", "../../shared/data/wikitext-2/"))
    try:
        done = _modelbuild(copy, "plan", outside, "--cache-dir", tmp_path / "cache", "--storage", tmp_path / "store")
    finally:
        outside.unlink()
    assert done.returncode == 2 and "not found" in done.stderr, done.stderr[-3000:]


def test_nothing_reaches_outside_the_repository():
    offenders = []
    for rel in _repository_files():
        if rel.split("/")[0] not in CHECKED or rel == "tests/test_self_contained.py":
            continue
        for n, line in enumerate((REPO / rel).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_shipped_data_is_what_its_readme_says():
    readme = (WIKITEXT / "README.md").read_text(encoding="utf-8")
    stated = dict(re.findall(r"`(\w+\.txt)`: .*?\n?\s*sha256 ([0-9a-f]{64})", readme))
    assert set(stated) == {"test.txt", "valid.txt"}
    for name, digest in stated.items():
        assert hashlib.sha256((WIKITEXT / name).read_bytes()).hexdigest() == digest, name
    assert "CC BY-SA 3.0" in readme and "Merity" in readme and "verbatim" in readme
