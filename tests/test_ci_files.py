"""The CI files: GitHub workflows validated against the workflow JSON schema (SchemaStore's, as
vendored by check-jsonschema, offline), every job with a timeout, every shell script clean under
shellcheck, and every workflow step calling the generic entry point with a job it has."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
SCRIPTS = [REPO / ".ci" / name for name in ("run", "setup", "modelbuild-ci")]


def _check_jsonschema(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_there_are_workflows_for_pull_requests_schedules_and_manual_builds():
    triggers = set()
    for path in WORKFLOWS:
        doc = yaml.safe_load(path.read_text())
        triggers |= set(doc.get("on", doc.get(True, {})))  # PyYAML reads the key `on` as True
    assert {"pull_request", "schedule", "workflow_dispatch"} <= triggers


@pytest.mark.parametrize("schema", ["vendor.github-workflows", "custom.github-workflows-require-timeout"])
def test_workflows_match_the_schema(schema):
    out = _check_jsonschema("--builtin-schema", schema, *WORKFLOWS)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_schema_check_can_fail(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(WORKFLOWS[0].read_text().replace("runs-on:", "run-on:"))
    assert _check_jsonschema("--builtin-schema", "vendor.github-workflows", bad).returncode == 1


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(script):
    shellcheck = Path(sys.executable).with_name("shellcheck")
    out = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout


def test_every_step_calls_a_job_the_entry_point_has():
    text = (REPO / ".ci" / "modelbuild-ci").read_text()
    jobs = set(re.findall(r"^  ([a-z]+)\)$", text, flags=re.M))
    assert jobs == {"pr", "scheduled", "build"}
    for path in WORKFLOWS:
        for job in yaml.safe_load(path.read_text())["jobs"].values():
            calls = [s["run"] for s in job["steps"] if "run" in s]
            assert calls and all(c.split()[0] == ".ci/modelbuild-ci" and c.split()[1] in jobs for c in calls), path
    usage = subprocess.run([str(REPO / ".ci" / "modelbuild-ci"), "nope"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the README's two pytest commands, in its order (each listing its slowest)."""
    from tests.test_docs import TEST_COMMAND

    lines = [line.split(" --durations")[0] for line in (REPO / ".ci" / "run").read_text().splitlines()
             if "-m pytest" in line]
    assert " && ".join(lines) == TEST_COMMAND
