"""publish_engine: a built TensorRT-LLM engine into storage, as its own published variant
(``<variant>-trtllm-<sm>-tp<N>-...``), with a manifest saying what it is tied to: the GPU
architecture, TensorRT-LLM and TensorRT versions, parallelism, limits and the build command.
The quality figures are the checkpoint's it was built from (same weights and scales)."""

from __future__ import annotations

from pipeline.publishing.manifest import build_manifest
from pipeline.storage.publish import publish_variant


def run(ctx, stage, inputs, out=None) -> dict:
    name = stage.params["variant"]
    engine_id = stage.params["engine_stage"]
    built = inputs[engine_id]
    manifest = build_manifest(ctx, stage, inputs)
    facts = built.result
    manifest.update({
        "variant": stage.params["name"],
        "built_from": {"variant": name, "build_key": inputs[f"quantize/{name}"].entry.key},
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
    return publish_variant(
        ctx.storage(), model=stage.params["model"], variant=stage.params["name"], build_key=stage.key,
        files_from=built.data / "engine", manifest=manifest,
    )
