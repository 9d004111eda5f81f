"""What one ``modelbuild run`` leaves for CI systems and people: ``summary.json`` (scripts),
``junit.xml`` (one test case per variant's gate: CI systems show them as tests) and
``summary.md`` (a job page; appended to ``$GITHUB_STEP_SUMMARY`` when GitHub Actions sets it).

JUnit follows the de-facto schema that Jenkins, GitLab and GitHub's test reporters read:
``testsuites > testsuite(name, tests, failures, errors, skipped, time) > testcase(classname,
name, time)`` with ``failure``/``error``/``skipped`` children. A gate that failed is a failure; a
variant whose stage failed, an error; a variant waiting for hardware this machine lacks, skipped.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, redact
from pipeline.stages.status import Status

SUMMARY_FORMAT = 1


def variant_rows(recipe, report) -> list[dict[str, Any]]:
    """One row per variant from a finished (or stopped) run: status, size, metrics, gate, where."""
    from pipeline.stages.gate import failure_lines

    rows = []
    for variant in recipe.variants:
        out = report.outcomes if report is not None else {}
        quant, evaluation = out.get(f"quantize/{variant.name}"), out.get(f"evaluate/{variant.name}")
        gate, publish = out.get(f"gate/{variant.name}"), out.get(f"publish/{variant.name}")
        row: dict[str, Any] = {"variant": variant.name, "backend": variant.backend}
        if gate is not None and gate.status != Status.NEEDS and "passed" in gate.result:
            row["status"] = "passed" if gate.result["passed"] else "failed"
            row["gate_failures"] = failure_lines(variant.name, gate.result)
            if gate.result["passed"] and publish is None:  # the run stopped between its gate and its publish
                row["status"] = "error"
        elif any(o is not None and o.status == Status.NEEDS for o in (quant, evaluation, gate)):
            row["status"] = "not built"
        else:
            row["status"] = "error"
        if quant is not None and quant.status != Status.NEEDS:
            row["size_bytes"] = quant.result.get("size_bytes")
            row["format"] = quant.result.get("format", {}).get("format")
        if evaluation is not None and evaluation.status != Status.NEEDS:
            row["metrics"] = evaluation.result.get("metrics")
            row["seconds"] = {"evaluate": evaluation.seconds}
        if publish is not None and publish.status != Status.NEEDS:
            row["publish"] = {k: publish.result.get(k) for k in ("status", "path", "version") if k in publish.result}
        rows.append(row)
    return rows


def stage_rows(report) -> list[dict[str, Any]]:
    """One row per finished stage, in the order they finished: status, seconds here and, where
    measured, peak resident memory (``executors.memory``)."""
    if report is None:
        return []
    rows = []
    for sid, outcome in report.outcomes.items():
        row: dict[str, Any] = {"stage": sid, "kind": outcome.stage.kind, "status": outcome.status.value,
                               "seconds": round(outcome.seconds, 3)}
        if outcome.peak is not None:
            row.update(outcome.peak.record())
        rows.append(row)
    return rows


def default_folder(recipe_name: str) -> Path:
    """``$MODELBUILD_REPORTS``, else ``reports/<recipe name>`` under the working directory."""
    env = os.environ.get("MODELBUILD_REPORTS")
    return Path(env) if env else Path("reports") / recipe_name


def write_for_run(folder: Path, prepared, report, *, exit_code: int, error: str | None, seconds: float) -> dict[str, Path]:
    """The three files of one run of a prepared plan (``report`` None when it stopped early)."""
    recipe = prepared.loaded.recipe
    baseline = report.outcomes["baseline"].result if report is not None and "baseline" in report.outcomes else None
    return write(folder, recipe_name=recipe.name, recipe_path=str(prepared.loaded.path), storage=prepared.storage,
                 rows=variant_rows(recipe, report), baseline=baseline, exit_code=exit_code, error=error,
                 seconds=seconds, placements=getattr(report, "placements", None), stages=stage_rows(report))


def write(folder: Path, *, recipe_name: str, recipe_path: str, storage: str, rows: list[dict[str, Any]],
          baseline: dict[str, Any] | None, exit_code: int, error: str | None, seconds: float,
          placements: dict[str, dict] | None = None, stages: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write the three files into ``folder``; returns their paths. ``placements``: where each
    stage ran (the Ray executor's node, host, pid, start and end); ``stages``: each finished
    stage's status, seconds and peak memory (``stage_rows``)."""
    summary = {
        "format": SUMMARY_FORMAT,
        "recipe": {"name": recipe_name, "path": recipe_path},
        "storage": storage,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 3),
        "exit_code": exit_code,
        "error": error,
        "baseline": baseline,
        "variants": rows,
    }
    if stages is not None:
        summary["stages"] = stages
    if placements is not None:
        summary["placements"] = placements
    paths = {"json": folder / "summary.json", "junit": folder / "junit.xml", "markdown": folder / "summary.md"}
    markdown = _markdown(summary)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic(paths["json"], json.dumps(summary, indent=2, default=str) + "\n")
        _atomic(paths["junit"], junit(recipe_name, rows, error, seconds))
        _atomic(paths["markdown"], markdown)
    except OSError as e:
        raise InputError(f"cannot write the run's reports: {e.strerror or e}", where=str(folder),
                         fix="give a writable --report-dir (or MODELBUILD_REPORTS)") from None
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        try:
            with open(step_summary, "a", encoding="utf-8") as f:
                f.write(markdown + "\n")
        except OSError as e:
            raise InputError(f"cannot append to GITHUB_STEP_SUMMARY: {e.strerror or e}", where=step_summary) from None
    return paths


def junit(recipe_name: str, rows: list[dict[str, Any]], error: str | None, seconds: float) -> str:
    suites = ET.Element("testsuites", name="modelbuild")
    suite = ET.SubElement(suites, "testsuite", name=f"modelbuild.gate.{recipe_name}")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for row in rows:
        counts["tests"] += 1
        case = ET.SubElement(suite, "testcase", classname=f"modelbuild.gate.{recipe_name}", name=row["variant"],
                             time=f"{(row.get('seconds') or {}).get('evaluate') or 0:.3f}")
        if row["status"] == "failed":
            counts["failures"] += 1
            lines = row.get("gate_failures") or ["gate failed"]
            ET.SubElement(case, "failure", type="GateFailed", message=lines[0]).text = "\n".join(lines)
        elif row["status"] == "not built":
            counts["skipped"] += 1
            ET.SubElement(case, "skipped", message="needs hardware this machine lacks (see the run's output)")
        elif row["status"] == "error":
            counts["errors"] += 1
            ET.SubElement(case, "error", type="StageError", message=error or "the run stopped before this variant was gated")
        metrics = row.get("metrics") or {}
        if metrics:
            ET.SubElement(case, "system-out").text = json.dumps(metrics, sort_keys=True)
    for key, value in counts.items():
        suite.set(key, str(value))
    suite.set("time", f"{seconds:.3f}")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _markdown(summary: dict[str, Any]) -> str:
    recipe = summary["recipe"]["name"]
    lines = [f"### modelbuild: {recipe}", ""]
    if summary["baseline"]:
        lines += [f"Baseline PPL {summary['baseline'].get('ppl', float('nan')):.3f} over "
                  f"{summary['baseline'].get('tokens_scored')} tokens; storage `{summary['storage']}`.", ""]
    if summary["error"]:
        lines += [f"**Stopped:** {summary['error']}", ""]
    lines += ["| variant | status | size MB | PPL ratio | mean KLD | top-1 |", "| --- | --- | --- | --- | --- | --- |"]
    icons = {"passed": "✅ passed", "failed": "❌ gate failed", "not built": "⏸ not built", "error": "⚠️ error"}
    for row in summary["variants"]:
        m = row.get("metrics") or {}
        size = f"{row['size_bytes'] / 1e6:.1f}" if row.get("size_bytes") else "–"

        def fmt(key: str, spec: str, m: dict = m) -> str:
            return format(m[key], spec) if isinstance(m.get(key), (int, float)) else "–"

        lines.append(f"| {row['variant']} | {icons[row['status']]} | {size} | {fmt('ppl_ratio', '.4f')} | "
                     f"{fmt('mean_kld', '.4f')} | {fmt('top1', '.3f')} |")
    failures = [line for row in summary["variants"] for line in row.get("gate_failures") or []]
    if failures:
        lines += ["", *[f"- {line}" for line in failures]]
    return "\n".join(lines) + "\n"


def _atomic(path: Path, text: str) -> None:
    text = redact(text)  # a report never carries a credential (an endpoint URL, a token)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # never a half-written report left beside the real one
        raise
