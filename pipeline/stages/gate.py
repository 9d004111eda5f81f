"""gate: compare a variant's metrics with its thresholds (pure; not cached, it costs nothing).

GGUF variants also carry the shared fidelity checks (``gguf_fidelity``): a tokenizer mismatch or
an inexact conversion fails every one of them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.recipe.gate import Gate
from pipeline.stages.context import StageInput

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class _Always(TypedDict):
    evaluation: StageInput


# Optional roles are those of a total=False class (NotRequired[] in a postponed annotation does
# not make a key optional at run time on Python 3.11).
class Inputs(_Always, total=False):
    fidelity: StageInput  # GGUF: the shared fidelity checks


class Result(TypedDict):
    passed: bool
    checks: list[dict[str, Any]]
    thresholds: dict[str, Any]


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path | None = None) -> Result:
    metrics = inputs["evaluation"].result["metrics"]
    gate = Gate(**stage.params["gate"])
    checks = gate.check(metrics)
    if "fidelity" in inputs:
        checks += inputs["fidelity"].result["checks"]
    return {"passed": all(c["passed"] for c in checks), "checks": checks, "thresholds": gate.model_dump()}


def failure_lines(variant: str, result: Result | dict[str, Any]) -> list[str]:
    """One line per failed check: variant, metric, value, threshold."""
    lines = []
    for c in result["checks"]:
        if not c["passed"]:
            value = "missing" if c["value"] is None else f"{c['value']:.4g}"
            bound = "max" if c["op"] == "<=" else "min"
            lines.append(f"gate failed: {variant}: {c['metric']} {value} (allowed {bound} {c['threshold']:g})")
    return lines
