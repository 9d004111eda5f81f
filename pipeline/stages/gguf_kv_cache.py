"""gguf_kv_cache: what a quantized KV cache costs one GGUF variant, measured in llama.cpp: the
eval windows scored again with each of the variant's ``kv_cache_types`` for keys and values
(flash attention on, which llama.cpp needs for a quantized V cache), against the same baseline.
Within a window every position attends to keys and values read back from the cache, so the
cache's rounding is in every logit, as it is when llama-server serves with ``-ctk/-ctv``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.backends import llamacpp
from pipeline.quality.metrics import summarise
from pipeline.quality.reference import Reference
from pipeline.quality.runner import window_logprobs
from pipeline.stages.context import StageInput
from pipeline.toolchains import gguf_reader

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class Inputs(TypedDict):
    checkpoint: StageInput  # the variant's GGUF
    baseline: StageInput


class Result(TypedDict):
    """Per cache type (``q8_0``, ...): the metrics against the baseline, as the evaluation's."""

    types: dict[str, dict[str, Any]]


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    import torch

    model = gguf_reader.gguf_file(inputs["checkpoint"].data)
    ref = Reference(inputs["baseline"].data)
    device = ctx.compute_device(stage)
    types: dict[str, dict[str, Any]] = {}
    for kind in stage.params["kv_cache_types"]:
        engine = llamacpp.LlamaEval(model, gpu=device.startswith("cuda"), kv_cache=kind)
        lps, klds, tops = [], [], []
        try:
            with ctx.reporter.steps(f"KV cache {kind}: {model.name}", ref.tokens.shape[0]) as advance:
                for i, (logprobs, next_ids) in enumerate(window_logprobs(engine, ref.tokens, device)):
                    lp, kld, top = ref.compare(i, logprobs, next_ids)
                    lps.append(lp)
                    klds.append(kld)
                    tops.append(top)
                    advance(1)
        finally:
            engine.close()
        types[kind] = summarise(torch.cat(lps), torch.cat(klds), torch.cat(tops), inputs["baseline"].result["ppl"])
    return {"types": types}
