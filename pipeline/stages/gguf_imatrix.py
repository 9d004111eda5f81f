"""gguf_imatrix: llama.cpp's importance matrix over the recipe's calibration samples.

The samples are drawn exactly as for every other calibrated variant (same windows, same seed),
decoded back to text for ``llama-imatrix``, which re-tokenizes them with the GGUF's own tokenizer
(identical to the model's, as the fidelity stage checks) in chunks of ``seq_len`` tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from pipeline.quality.calibration import calibration_samples
from pipeline.stages.context import StageInput
from pipeline.toolchains import gguf_reader, llamacpp_tools

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class Inputs(TypedDict):
    conversion: StageInput  # the F16 GGUF
    fetch: StageInput  # the checkpoint, for its tokenizer


class Result(TypedDict):
    file: str
    chunks: int
    ctx: int
    threads: int


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    from transformers import AutoTokenizer

    settings = stage.params["calibration"]
    checkpoint = inputs["fetch"].data
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=ctx.recipe.source.trust_remote_code)
    samples = calibration_samples(ctx.recipe.calibration, samples=settings["samples"], seq_len=settings["seq_len"],
                                  seed=settings["seed"], tokenizer=tokenizer)
    cal = ctx.recipe.calibration
    corpus = cal.path.name if cal.path is not None else cal.dataset.path.replace("/", "_")
    # The name is recorded in the matrix and in every file quantized with it.
    text = out / f"{corpus}-{settings['samples']}x{settings['seq_len']}-seed{settings['seed']}.txt"
    text.write_text("".join(tokenizer.decode(ids) for ids in samples), encoding="utf-8")
    model = gguf_reader.gguf_file(inputs["conversion"].data)
    target = out / "imatrix.gguf"
    threads = max(1, os.cpu_count() or 1)
    with ctx.reporter.steps("llama-imatrix", 1) as advance:
        llamacpp_tools.imatrix(model, text, target, ctx=settings["seq_len"], chunks=settings["samples"], threads=threads,
                               gpu=ctx.compute_device(stage).startswith("cuda"))
        advance(1)
    text.unlink()
    return {"file": target.name, "chunks": settings["samples"], "ctx": settings["seq_len"], "threads": threads}
