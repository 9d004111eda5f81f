"""What every variant's part of the DAG starts from: the planning context and the standard
chain of one variant (``quantize ─► evaluate ─► gate ─► publish``).

Chains that need more (GGUF's shared conversion: ``pipeline.plan.gguf``; TensorRT-LLM's engines:
``pipeline.plan.trtllm``) are planned beside it; a backend names its chain (``Backend.chain``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.stages import VERSIONS
from pipeline.stages.base import Hints, Stage

EVAL_TOOLS = ("torch", "transformers")


@dataclass
class Planning:
    """What the planner reads while adding a variant's stages.

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


def publish_params(backend, variant, planning: Planning) -> dict[str, Any]:
    """A variant's publish parameters: what the model card and manifest name, and the serving
    profiles of the engines that load it, for the recipe's targets (base_model is in the model
    card: a new one is a new version)."""
    from pipeline.publishing.serving import profiles_for

    recipe = planning.recipe
    return {"model": recipe.model_name, "variant": variant.name, "base_model": recipe.base_model,
            "serving_profiles": profiles_for(backend, variant, recipe.targets)}


def standard_stages(backend, variant, planning: Planning) -> list[Stage]:
    """``quantize/<v> ─► evaluate/<v> ─► gate/<v> ─► publish/<v>`` for one variant."""
    recipe = planning.recipe
    name = variant.name
    params: dict[str, Any] = {"backend": variant.backend, "options": variant.backend_params()}
    calibration = planning.calibration(variant)
    if calibration is not None:
        params["calibration"] = {"sha256": planning.data["calibration"], **calibration}
    quantize = Stage.wired(
        id=f"quantize/{name}",
        kind="quantize",
        params=params,
        inputs={"checkpoint": "fetch"},
        variant=name,
        tools=backend.tools,
        version=VERSIONS["quantize"],
        hints=Hints(uses_gpu=True, memory_model=backend.memory(variant)["quantize"]),
    )
    evaluate = Stage.wired(
        id=f"evaluate/{name}",
        kind="evaluate",
        params={**planning.eval_params, "backend": variant.backend},
        inputs={"checkpoint": quantize.id, "baseline": "baseline"},
        variant=name,
        tools=tuple(sorted(set(EVAL_TOOLS) | set(backend.tools))),
        version=VERSIONS["evaluate"],
        hints=Hints(uses_gpu=True, memory_model=backend.memory(variant)["evaluate"]),
    )
    gate = Stage.wired(
        id=f"gate/{name}",
        kind="gate",
        params={"gate": recipe.eval.gate.merged(variant.gate).model_dump()},
        inputs={"evaluation": evaluate.id},
        variant=name,
        version=VERSIONS["gate"],
        cached=False,
    )
    publish = Stage.wired(
        id=f"publish/{name}",
        kind="publish",
        params=publish_params(backend, variant, planning),
        inputs={"checkpoint": quantize.id, "evaluation": evaluate.id, "gate": gate.id, "baseline": "baseline",
                "fetch": "fetch"},
        variant=name,
        version=VERSIONS["publish"],
        cached=False,
    )
    stages: list[Stage] = []
    for stage in (quantize, evaluate, gate, publish):
        planning.add(stages, stage)
    return stages
