"""What every backend's part of the DAG starts from: the planning context and the standard
chain of one variant (``quantize ─► evaluate ─► gate ─► publish``).

Backends that need more (GGUF's shared conversion, TensorRT-LLM's engines) extend it in their
``Backend.plan_stages``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.plan.stage import Hints, Stage
from pipeline.stages import VERSIONS

EVAL_TOOLS = ("torch", "transformers")


@dataclass
class Planning:
    """What a backend may read while adding its stages.

    Attributes:
        recipe: the validated recipe.
        data: corpus digests (``eval``, ``calibration``).
        eval_params: the evaluation parameters every evaluate stage shares.
        existing: ids already in the DAG (shared stages are added once).
    """

    recipe: Any
    data: dict[str, str]
    eval_params: dict[str, Any]
    existing: set[str] = field(default_factory=set)

    def calibration(self, variant) -> dict[str, Any] | None:
        """The recipe's calibration sampling with the variant's overrides, or None when the
        variant uses none."""
        if not variant.needs_calibration():
            return None
        cal = self.recipe.calibration
        over = variant.calibration
        pick = lambda name: getattr(over, name) if over is not None and getattr(over, name) is not None else getattr(cal, name)  # noqa: E731
        return {"samples": pick("samples"), "seq_len": pick("seq_len"), "seed": pick("seed"), "chat_template": cal.chat_template}

    def add(self, stages: list[Stage], stage: Stage) -> Stage:
        """Append ``stage`` unless a stage with its id is already planned."""
        if stage.id not in self.existing:
            self.existing.add(stage.id)
            stages.append(stage)
        return stage


def standard_stages(backend, variant, planning: Planning) -> list[Stage]:
    """``quantize/<v> ─► evaluate/<v> ─► gate/<v> ─► publish/<v>`` for one variant."""
    recipe = planning.recipe
    params: dict[str, Any] = {"backend": variant.backend, "options": variant.backend_params()}
    calibration = planning.calibration(variant)
    if calibration is not None:
        params["calibration"] = {"sha256": planning.data["calibration"], **calibration}
    quantize = Stage(
        id=f"quantize/{variant.name}",
        kind="quantize",
        params=params,
        inputs=("fetch",),
        tools=backend.tools,
        version=VERSIONS["quantize"],
        hints=Hints(uses_gpu=True),
    )
    evaluate = Stage(
        id=f"evaluate/{variant.name}",
        kind="evaluate",
        params={**planning.eval_params, "backend": variant.backend},
        inputs=(quantize.id, "baseline"),
        tools=tuple(sorted(set(EVAL_TOOLS) | set(backend.tools))),
        version=VERSIONS["evaluate"],
        hints=Hints(uses_gpu=True),
    )
    gate = Stage(
        id=f"gate/{variant.name}",
        kind="gate",
        params={"gate": recipe.eval.gate.merged(variant.gate).model_dump()},
        inputs=(evaluate.id,),
        version=VERSIONS["gate"],
        cached=False,
    )
    publish = Stage(
        id=f"publish/{variant.name}",
        kind="publish",
        # base_model is in the model card: a new one is a new version.
        params={"model": recipe.model_name, "variant": variant.name, "base_model": recipe.base_model,
                **backend.publish_params(variant, planning)},
        inputs=(quantize.id, evaluate.id, gate.id, "baseline", "fetch"),
        version=VERSIONS["publish"],
        cached=False,
    )
    stages: list[Stage] = []
    for stage in (quantize, evaluate, gate, publish):
        planning.add(stages, stage)
    return stages
