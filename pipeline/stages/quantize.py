"""quantize: run the variant's backend on the fetched checkpoint (with calibration samples when
the variant needs them)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

from pipeline.backends import get_backend
from pipeline.backends.base import Quantizer
from pipeline.errors import StageError
from pipeline.quality.calibration import calibration_samples
from pipeline.stages.context import StageInput

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class Inputs(TypedDict):
    checkpoint: StageInput  # the fetched model


class Result(TypedDict):
    """The format and size of the quantized files, and the backend's own facts
    (``Backend.quantize``; they differ per backend)."""

    format: dict[str, Any]
    size_bytes: int
    device: str  # where the backend computed (cpu, cuda): GPU and CPU builds differ in rounding


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    variant = ctx.variant(stage.variant)
    backend = get_backend(variant.backend)
    if not isinstance(backend, Quantizer):  # the planner plans quantize stages for Quantizers only
        raise StageError(f"backend {backend.name!r} does not quantize in the quantize stage", where=stage.id)
    checkpoint = inputs["checkpoint"].data
    samples = None
    settings = stage.params.get("calibration")
    if settings is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=ctx.recipe.source.trust_remote_code)
        samples = calibration_samples(
            ctx.recipe.calibration, samples=settings["samples"], seq_len=settings["seq_len"],
            seed=settings["seed"], tokenizer=tokenizer,
        )
    device = ctx.compute_device(stage)
    facts = backend.quantize(variant, checkpoint, out, calibration=samples, device=device)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return cast("Result", {"format": asdict(backend.describe(variant)), "size_bytes": size, "device": device,
                           **facts})
