"""gguf_speed: prompt-processing and generation tokens/s of one GGUF file with llama-bench, on
this machine's CPU (named in the result), at a fixed thread count, median of repetitions."""

from __future__ import annotations

from pathlib import Path

from pipeline.toolchains import gguf_reader, llamacpp_tools


def run(ctx, stage, inputs, out: Path) -> dict:
    p = stage.params
    model = gguf_reader.gguf_file(inputs[stage.inputs[0]].data)
    with ctx.reporter.steps(f"llama-bench {model.name}", 1) as advance:
        figures = llamacpp_tools.bench(model, threads=p["threads"], prompt_tokens=p["prompt_tokens"],
                                 gen_tokens=p["gen_tokens"], repetitions=p["repetitions"])
        advance(1)
    return {**figures, "cpu_model": p["cpu"], "tool": "llama-bench"}
