"""publish_engine: a built TensorRT-LLM engine into storage, as its own published variant
(``<variant>-trtllm-<sm>-tp<N>-...``), with a manifest saying what it is tied to: the GPU
architecture, TensorRT-LLM and TensorRT versions, parallelism, limits and the build command.
The quality figures are the checkpoint's it was built from (same weights and scales)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from pipeline.publishing.manifest import build_manifest
from pipeline.stages import publish
from pipeline.stages.context import StageInput
from pipeline.stages.publish import Result
from pipeline.storage.publish import publish_variant

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class Inputs(publish.Inputs, total=True):
    """A variant's publish inputs (``checkpoint``: the one the engine was built from, whose
    quality figures are the engine's), and the engine."""

    engine: StageInput


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path | None = None) -> Result:
    name = stage.params["variant"]
    built = inputs["engine"]
    manifest = build_manifest(ctx, stage, inputs)
    facts = built.result
    manifest.update({
        "variant": stage.params["name"],
        "built_from": {"variant": name, "build_key": inputs["checkpoint"].stored.key},
        "format": {
            **manifest["format"],
            "format": "tensorrt-llm-engine",
            "engines": ["trtllm-engine"],
            "serve": {"trtllm-engine": f"trtllm-serve {{path}} --backend tensorrt --tp_size {facts['tp']} "
                                       f"--pp_size {facts['pp']} --max_batch_size {facts['limits']['max_batch_size']}"},
        },
        "engine": facts,
        "size_bytes": sum(p.stat().st_size for p in built.data.rglob("*") if p.is_file()),
    })
    return cast("Result", publish_variant(
        ctx.storage(), model=stage.params["model"], variant=stage.params["name"], build_key=stage.key,
        files_from=built.data / "engine", manifest=manifest,
    ))
