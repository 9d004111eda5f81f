"""publish: copy a gated variant into storage with its manifest (see pipeline.storage)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast

from pipeline.publishing.manifest import PublishInputs as Inputs
from pipeline.publishing.manifest import build_manifest
from pipeline.publishing.model_card import model_card
from pipeline.publishing.serving import profile_files
from pipeline.storage.publish import publish_variant

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class _Status(TypedDict):
    status: str


class Result(_Status, total=False):
    """``pipeline.storage.publish.publish_variant``'s answer (path and version once published)."""

    path: str
    version: str


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path | None = None) -> Result:
    name = stage.params["variant"]
    gate = inputs["gate"].result
    if not gate["passed"]:
        return {"status": "not published (gate failed)"}
    manifest = build_manifest(ctx, stage, inputs)
    checkpoint = inputs["checkpoint"]
    files = checkpoint.result.get("files") or [""]
    # llama.cpp profiles name the GGUF file, known only once it is written.
    profiles = [{**p, "command": p["command"].replace("{file}", files[0])} for p in stage.params.get("serving_profiles", [])]
    if profiles:
        manifest["serving_profiles"] = profiles
    return cast("Result", publish_variant(
        ctx.storage(),
        model=stage.params["model"],
        variant=name,
        build_key=stage.key,
        files_from=checkpoint.data,
        manifest=manifest,
        # The card shows the final serve commands and version, known once publish fills them in.
        extra_files=lambda final: {**profile_files(profiles), "README.md": model_card(final, stage.params.get("base_model"))},
        expected=checkpoint.stored.record["files"],
    ))
