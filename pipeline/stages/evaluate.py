"""evaluate: one forward pass of the variant over the baseline's token windows.

The variant is scored by its backend as its engine computes (weights dequantized exactly as
stored, one decoder layer at a time where the backend reads its format layer by layer, and
activation quantization simulated; or the engine itself, as llama.cpp), and compared position by
position with the cached baseline side: no baseline forward is repeated.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.backends import get_backend
from pipeline.quality.metrics import summarise
from pipeline.quality.reference import Reference
from pipeline.stages.context import StageInput

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class Inputs(TypedDict):
    checkpoint: StageInput  # the variant's quantized files
    baseline: StageInput


class Result(TypedDict):
    metrics: dict[str, float]
    baseline_ppl: float
    device: str
    cpu_evaluation: str
    kld_method: Any
    forward_seconds: float


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    import torch
    from safetensors.torch import save_file

    variant = ctx.variant(stage.variant)
    name = variant.name
    backend = get_backend(variant.backend)
    baseline = inputs["baseline"]
    ref = Reference(baseline.data)
    windows = ref.tokens

    device = ctx.compute_device(stage)
    lps, klds, tops = [], [], []
    started = time.perf_counter()
    # Scratch beside the entry being written: on the cache's disk, and gone with it if the run dies.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix="scratch-") as scratch, \
            ctx.reporter.steps(f"evaluate {name}", windows.shape[0]) as advance:
        scored = backend.scores(inputs["checkpoint"].data, windows, device, Path(scratch))
        for i, (logprobs, next_ids) in enumerate(scored):
            lp, kld, top = ref.compare(i, logprobs, next_ids)
            lps.append(lp)
            klds.append(kld)
            tops.append(top)
            advance(1)
    forward_s = time.perf_counter() - started
    target_lp, kld = torch.cat(lps), torch.cat(klds)
    save_file({"target_logprob": target_lp, "kld": kld}, str(out / "per_token.safetensors"))
    metrics = summarise(target_lp, kld, torch.cat(tops), baseline.result["ppl"])
    return {
        "metrics": metrics,
        "baseline_ppl": baseline.result["ppl"],
        "device": device,
        "cpu_evaluation": backend.describe(variant).cpu_evaluation,
        "kld_method": Reference.describe(baseline.result),
        "forward_seconds": round(forward_s, 3),
    }
