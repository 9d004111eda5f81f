"""The TensorRT-LLM part of the build DAG (modelopt variants that ask for legacy engines).

::

    quantize/<v> ─► evaluate/<v> ─► gate/<v> ─► publish/<v>
         └──────────────┬──── (after the gate) ─► engine/<v>/<profile> ─► publish-engine/<v>/<profile>

Per requested engine: ``engine/<v>/<profile>`` (needs a GPU of that architecture and TensorRT-LLM;
built only from a checkpoint that passed its gate, whose verdict does not enter the engine's key)
and ``publish-engine/<v>/<profile>``.
"""

from __future__ import annotations

from pipeline.errors import RecipeError
from pipeline.hardware import compute_capability, sm_name
from pipeline.plan.variant_stages import Planning, standard_stages
from pipeline.stages import VERSIONS
from pipeline.stages.base import Hints, Stage


def trtllm_stages(backend, variant, planning: Planning) -> list[Stage]:
    """The standard chain of ``variant``, then its engines and their publishing."""
    stages = standard_stages(backend, variant, planning)
    v = variant.name
    ids = {s.kind: s.id for s in stages}
    quantize, evaluate, gate = ids["quantize"], ids["evaluate"], ids["gate"]
    for spec in variant.engines:
        cc = compute_capability(spec.gpu)
        if cc is None:  # the schema takes known GPUs only
            raise RecipeError(f"unknown GPU {spec.gpu!r} for an engine of {v}", field="engines")
        sm = sm_name(cc)
        engine = Stage.wired(
            id=f"engine/{v}/{spec.profile}",
            kind="trtllm_engine",
            params={"variant": v, "engine": spec.model_dump(mode="json"), "sm": sm},
            inputs={"checkpoint": quantize},
            after={"gate": gate},
            variant=v,
            tools=("tensorrt_llm", "tensorrt"),
            version=VERSIONS["trtllm_engine"],
            hints=Hints(needs_gpu=True, requires=(f"gpu:{sm}", "tensorrt_llm")),
        )
        publish = Stage.wired(
            id=f"publish-engine/{v}/{spec.profile}",
            kind="publish_engine",
            params={"model": planning.recipe.model_name, "variant": v, "name": f"{v}-trtllm-{spec.profile}",
                    "engine_stage": engine.id},
            inputs={"engine": engine.id, "checkpoint": quantize, "evaluation": evaluate, "gate": gate,
                    "baseline": "baseline", "fetch": "fetch"},
            variant=v,
            version=VERSIONS["publish"],
            cached=False,
        )
        planning.add(stages, engine)
        planning.add(stages, publish)
    return stages
