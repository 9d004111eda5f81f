"""gguf_speed: prompt-processing and generation tokens/s of one GGUF file with llama-bench, on
this machine's CPU (named in the result), at a fixed thread count: the median of the repetitions,
their min-max, and how busy other processes kept the machine (measured again when busy, flagged
when it stayed so)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast

from pipeline.stages.context import StageInput
from pipeline.toolchains import gguf_reader, llamacpp_tools

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class Inputs(TypedDict):
    checkpoint: StageInput  # the variant's GGUF


class Result(TypedDict):
    """llama-bench's figures (``pipeline.toolchains.llamacpp_tools.bench``) and where they were measured."""

    cpu_model: str
    tool: str


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    p = stage.params
    model = gguf_reader.gguf_file(inputs["checkpoint"].data)
    with ctx.reporter.steps(f"llama-bench {model.name}", 1) as advance:
        figures = llamacpp_tools.bench(model, threads=p["threads"], prompt_tokens=p["prompt_tokens"],
                                 gen_tokens=p["gen_tokens"], repetitions=p["repetitions"])
        advance(1)
    return cast("Result", {**figures, "cpu_model": p["cpu"], "tool": "llama-bench"})
