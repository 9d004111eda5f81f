"""quantize: run the variant's backend on the fetched checkpoint (with calibration samples when
the variant needs them)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.backends import get_backend
from pipeline.quality.calibration import calibration_samples


def run(ctx, stage, inputs, out: Path) -> dict:
    variant = ctx.variant(stage.id.split("/", 1)[1])
    backend = get_backend(variant.backend)
    checkpoint = inputs["fetch"].data
    samples = None
    settings = stage.params.get("calibration")
    if settings is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=ctx.recipe.source.trust_remote_code)
        samples = calibration_samples(
            ctx.recipe.calibration, samples=settings["samples"], seq_len=settings["seq_len"],
            seed=settings["seed"], tokenizer=tokenizer,
        )
    facts = backend.quantize(variant, checkpoint, out, calibration=samples, device=ctx.device)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"format": asdict(backend.describe(variant)), "size_bytes": size, **facts}
