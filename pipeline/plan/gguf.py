"""The GGUF part of the build DAG (llamacpp variants).

::

    fetch ──► gguf/convert-f16 ──┬──► gguf/imatrix ──┐
      │                          ├──► quantize/<v> ◄─┘ ──► evaluate/<v> ──► gate/<v> ──► publish/<v>
      │                          │         ├────────────► speed/<v> ───────────────────────┤
      │                          │         └────────────► kv-cache/<v> (kv_cache_types) ───┘
      └─► baseline ──────────────┴──► gguf/fidelity ──────────────────────► (every GGUF gate)

One F16 conversion serves every type (BF16 gets its own conversion); one importance matrix per
calibration setting serves every type that uses it; the fidelity checks (tokenizer, F16 vs the
baseline) run once and gate every GGUF variant.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.errors import RecipeError
from pipeline.plan.variant_stages import Planning, publish_params
from pipeline.sources.tokenizer_check import AWKWARD_STRINGS
from pipeline.stages import VERSIONS
from pipeline.stages.base import Hints, Stage

TOOLS = ("llama.cpp",)
CONVERT_TOOLS = ("llama.cpp", "transformers", "torch")


def gguf_stages(backend, variant, planning: Planning) -> list[Stage]:
    """The stages one llamacpp variant needs, shared ones first (those already planned are left
    out)."""
    recipe, data, eval_params = planning.recipe, planning.data, planning.eval_params
    calibration = planning.calibration(variant)
    cpu = cpu_model()
    # With a CUDA llama.cpp, the importance matrix and the evaluation can run on a GPU builder's
    # GPUs (``plan.build`` then keys them for it); the rest stays on the CPU.
    on_gpu = Hints(uses_gpu=backend.gpu_capable())
    stages: list[Stage] = []

    def add(stage: Stage) -> Stage:
        return planning.add(stages, stage)

    metadata = converter_metadata(recipe)
    license = recipe.source.license
    f16 = add(_convert("f16", metadata, license))
    base = add(_convert("bf16", metadata, license)) if variant.type == "BF16" else f16
    fidelity = add(Stage.wired(
        id="gguf/fidelity",
        kind="gguf_fidelity",
        params={"max_kld": recipe.gguf.fidelity.max_kld, "strings": list(AWKWARD_STRINGS) + recipe.gguf.fidelity.strings,
                **eval_params},
        inputs={"conversion": f16.id, "baseline": "baseline", "fetch": "fetch"},
        tools=("llama.cpp", "transformers"),
        version=VERSIONS["gguf_fidelity"],
    ))
    quantize_inputs = {"conversion": base.id}
    if variant.uses_imatrix():
        if calibration is None:  # never: a llamacpp variant needs calibration exactly when it uses an imatrix
            raise RecipeError(f"variant {variant.name} uses an importance matrix but has no calibration",
                              field="calibration")
        digest = hashlib.sha256(repr(sorted(calibration.items())).encode()).hexdigest()[:8]
        imatrix = add(Stage.wired(
            id=f"gguf/imatrix-{digest}",
            kind="gguf_imatrix",
            params={"calibration": {"sha256": data["calibration"], **calibration}},
            inputs={"conversion": f16.id, "fetch": "fetch"},
            tools=TOOLS + ("transformers",),
            version=VERSIONS["gguf_imatrix"],
            hints=on_gpu,
        ))
        quantize_inputs["imatrix"] = imatrix.id
    name = variant.name
    quantize = add(Stage.wired(
        id=f"quantize/{name}",
        kind="gguf_quantize",
        params={"backend": variant.backend, "options": variant.backend_params(), "base": base.id},
        inputs=quantize_inputs,
        variant=name,
        tools=TOOLS,
        version=VERSIONS["gguf_quantize"],
    ))
    evaluate = add(Stage.wired(
        id=f"evaluate/{name}",
        kind="evaluate",
        params={**eval_params, "backend": variant.backend},
        inputs={"checkpoint": quantize.id, "baseline": "baseline"},
        variant=name,
        tools=TOOLS + ("torch",),
        version=VERSIONS["evaluate"],
        hints=on_gpu,
    ))
    speed = add(Stage.wired(
        id=f"speed/{name}",
        kind="gguf_speed",
        # The CPU enters the key: figures measured on another machine are not this one's.
        params={**recipe.gguf.speed.model_dump(), "cpu": cpu},
        inputs={"checkpoint": quantize.id},
        variant=name,
        tools=TOOLS,
        version=VERSIONS["gguf_speed"],
    ))
    gate = add(Stage.wired(
        id=f"gate/{name}",
        kind="gate",
        params={"gate": recipe.eval.gate.merged(variant.gate).model_dump()},
        inputs={"evaluation": evaluate.id, "fidelity": fidelity.id},
        variant=name,
        version=VERSIONS["gate"],
        cached=False,
    ))
    publish_inputs = {"checkpoint": quantize.id, "evaluation": evaluate.id, "gate": gate.id, "baseline": "baseline",
                      "fetch": "fetch", "speed": speed.id, "fidelity": fidelity.id}
    if variant.kv_cache_types:
        publish_inputs["kv_cache"] = add(Stage.wired(
            id=f"kv-cache/{name}",
            kind="gguf_kv_cache",
            params={**eval_params, "kv_cache_types": list(variant.kv_cache_types)},
            inputs={"checkpoint": quantize.id, "baseline": "baseline"},
            variant=name,
            tools=TOOLS + ("torch",),
            version=VERSIONS["gguf_kv_cache"],
            hints=on_gpu,
        )).id
    add(Stage.wired(
        id=f"publish/{name}",
        kind="publish",
        params=publish_params(backend, variant, planning),
        inputs=publish_inputs,
        variant=name,
        version=VERSIONS["publish"],
        cached=False,
    ))
    return stages


def _convert(outtype: str, metadata: dict[str, Any], license: str | None) -> Stage:
    return Stage.wired(
        id=f"gguf/convert-{outtype}",
        kind="gguf_convert",
        params={"outtype": outtype, "metadata": metadata, "license": license},
        inputs={"checkpoint": "fetch"},
        tools=CONVERT_TOOLS,
        version=VERSIONS["gguf_convert"],
    )


def converter_metadata(recipe) -> dict[str, Any]:
    """The converter's ``--metadata`` overrides (GGUF ``general.*`` keys) from the recipe."""
    meta = recipe.gguf.metadata
    source = recipe.source
    base_model = meta.base_model or source.base_model or (source.repo if source.kind == "hub" else None)
    out: dict[str, Any] = {
        "general.name": meta.name or recipe.model_name,
        "general.basename": meta.basename or (meta.name or recipe.model_name).replace(" ", "-"),
        "general.quantized_by": meta.quantized_by,
    }
    for key, value in (("general.finetune", meta.finetune), ("general.version", meta.version),
                       ("general.size_label", meta.size_label)):
        if value:
            out[key] = value
    if base_model:
        org, _, name = base_model.partition("/")
        out["general.base_models"] = [{"name": name, "organization": org, "repo_url": f"https://huggingface.co/{base_model}"}]
    return out


def cpu_model() -> str:
    """The CPU's model name (speed figures belong to it)."""
    import platform

    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
