"""fetch: materialize the source as a safetensors checkpoint folder in the cache."""

from __future__ import annotations

from pathlib import Path

from pipeline import sources
from pipeline.sources.checkpoint import inspect_checkpoint


def run(ctx, stage, inputs, out: Path) -> dict:
    source = ctx.recipe.source
    facts = sources.materialize(source, ctx.source, out)
    # Whatever the kind, the cached checkpoint must pass the same checks as a local folder.
    inspect_checkpoint(out, allow_pickle=source.allow_pickle, trust_remote_code=source.trust_remote_code, where="fetch")
    return {"provenance": ctx.source.provenance, **facts}
