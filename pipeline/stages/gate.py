"""gate: compare a variant's metrics with its thresholds (pure; not cached, it costs nothing).

GGUF variants also carry the shared fidelity checks (``gguf_fidelity``): a tokenizer mismatch or
an inexact conversion fails every one of them."""

from __future__ import annotations

from pipeline.recipe.gate import Gate


def run(ctx, stage, inputs, out=None) -> dict:
    name = stage.id.split("/", 1)[1]
    metrics = inputs[f"evaluate/{name}"].result["metrics"]
    gate = Gate(**stage.params["gate"])
    checks = gate.check(metrics)
    if "gguf/fidelity" in inputs:
        checks += inputs["gguf/fidelity"].result["checks"]
    return {"passed": all(c["passed"] for c in checks), "checks": checks, "thresholds": gate.model_dump()}


def failure_lines(variant: str, result: dict) -> list[str]:
    """One line per failed check: variant, metric, value, threshold."""
    lines = []
    for c in result["checks"]:
        if not c["passed"]:
            value = "missing" if c["value"] is None else f"{c['value']:.4g}"
            bound = "max" if c["op"] == "<=" else "min"
            lines.append(f"gate failed: {variant}: {c['metric']} {value} (allowed {bound} {c['threshold']:g})")
    return lines
