"""publish: copy a gated variant into storage with its manifest (see pipeline.storage)."""

from __future__ import annotations

from pipeline.publishing.manifest import build_manifest
from pipeline.publishing.model_card import model_card
from pipeline.publishing.serving import profile_files
from pipeline.storage.publish import publish_variant


def run(ctx, stage, inputs, out=None) -> dict:
    name = stage.params["variant"]
    gate = inputs[f"gate/{name}"].result
    if not gate["passed"]:
        return {"status": "not published (gate failed)"}
    manifest = build_manifest(ctx, stage, inputs)
    files = inputs[f"quantize/{name}"].result.get("files") or [""]
    # llama.cpp profiles name the GGUF file, known only once it is written.
    profiles = [{**p, "command": p["command"].replace("{file}", files[0])} for p in stage.params.get("serving_profiles", [])]
    if profiles:
        manifest["serving_profiles"] = profiles
    return publish_variant(
        ctx.storage(),
        model=stage.params["model"],
        variant=name,
        build_key=stage.key,
        files_from=inputs[f"quantize/{name}"].data,
        manifest=manifest,
        # The card shows the final serve commands and version, known once publish fills them in.
        extra_files=lambda final: {**profile_files(profiles), "README.md": model_card(final, stage.params.get("base_model"))},
        expected=inputs[f"quantize/{name}"].entry.record["files"],
    )
