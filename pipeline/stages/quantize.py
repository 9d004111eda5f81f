"""quantize: run the variant's backend on the fetched checkpoint."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.backends import get_backend


def run(ctx, stage, inputs, out: Path) -> dict:
    variant = ctx.variant(stage.id.split("/", 1)[1])
    backend = get_backend(variant.backend)
    facts = backend.quantize(variant, inputs["fetch"].data, out, calibration=None, device=ctx.device)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"format": asdict(backend.describe(variant)), "size_bytes": size, **facts}
