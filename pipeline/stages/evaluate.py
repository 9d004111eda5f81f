"""evaluate: one forward pass of the variant over the baseline's token windows.

The variant is loaded by its backend as its engine computes (weights dequantized exactly as
stored and activation quantization simulated, or the engine itself, as llama.cpp), and compared position by position with the cached
baseline side: no baseline forward is repeated.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.backends import get_backend
from pipeline.quality.metrics import summarise
from pipeline.quality.reference import Reference
from pipeline.quality.runner import window_logprobs
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

    model = backend.load_for_eval(inputs["checkpoint"].data, ctx.device)
    forward = backend.forward(model)
    lps, klds, tops = [], [], []
    started = time.perf_counter()
    with ctx.reporter.steps(f"evaluate {name}", windows.shape[0]) as advance:
        for i, (logprobs, next_ids) in enumerate(window_logprobs(forward, windows, ctx.device)):
            lp, kld, top = ref.compare(i, logprobs, next_ids)
            lps.append(lp)
            klds.append(kld)
            tops.append(top)
            advance(1)
    forward_s = time.perf_counter() - started
    if hasattr(model, "close"):  # an engine holding native memory (llama.cpp)
        model.close()
    target_lp, kld = torch.cat(lps), torch.cat(klds)
    save_file({"target_logprob": target_lp, "kld": kld}, str(out / "per_token.safetensors"))
    metrics = summarise(target_lp, kld, torch.cat(tops), baseline.result["ppl"])
    return {
        "metrics": metrics,
        "baseline_ppl": baseline.result["ppl"],
        "device": ctx.device,
        "cpu_evaluation": backend.describe(variant).cpu_evaluation,
        "kld_method": Reference.describe(baseline.result),
        "forward_seconds": round(forward_s, 3),
    }
