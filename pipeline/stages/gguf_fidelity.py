"""gguf_fidelity: is the F16 GGUF the same model as the checkpoint? Two checks, each failing
every GGUF variant's gate when it fails:

- tokenizer: llama.cpp's tokenizer (from the GGUF's vocabulary) gives the same ids as the
  checkpoint's Hugging Face tokenizer on the whole eval text and on awkward strings (whitespace
  runs, unicode, digits, special tokens) (``pipeline.sources.tokenizer_check.compare_tokenizers``);
- conversion: the F16 file's next-token distributions, computed by llama.cpp, match the baseline's
  (mean KL divergence at most ``max_kld``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.backends import llamacpp
from pipeline.quality.corpus import read_text
from pipeline.quality.reference import Reference
from pipeline.quality.runner import window_logprobs

# Shared with the fetch stage, which runs the same comparison for GGUF sources.
from pipeline.sources.tokenizer_check import compare_tokenizers
from pipeline.stages.context import StageInput
from pipeline.toolchains import gguf_reader

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class Inputs(TypedDict):
    conversion: StageInput  # the F16 GGUF
    baseline: StageInput
    fetch: StageInput  # the checkpoint, for its Hugging Face tokenizer


class Result(TypedDict):
    tokenizer: dict[str, Any]
    f16_mean_kld: float
    f16_max_kld: float
    max_kld: float
    checks: list[dict[str, Any]]  # as the gate's, added to every GGUF gate


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    import torch
    from transformers import AutoTokenizer

    p = stage.params
    model = gguf_reader.gguf_file(inputs["conversion"].data)
    hf = AutoTokenizer.from_pretrained(inputs["fetch"].data, trust_remote_code=ctx.recipe.source.trust_remote_code)
    texts = [read_text(ctx.recipe.eval.corpus, what="eval.corpus"), *p["strings"]]
    tokenizer = compare_tokenizers(model, hf, texts)

    ref = Reference(inputs["baseline"].data)
    engine = llamacpp.LlamaEval(model)
    klds = []
    with ctx.reporter.steps("fidelity: F16 GGUF vs baseline", ref.tokens.shape[0]) as advance:
        for i, (logprobs, next_ids) in enumerate(window_logprobs(engine, ref.tokens, "cpu")):
            klds.append(ref.compare(i, logprobs, next_ids)[1])
            advance(1)
    engine.close()
    kld = torch.cat(klds)
    mean_kld = float(kld.mean())
    return {
        "tokenizer": tokenizer,
        "f16_mean_kld": mean_kld,
        "f16_max_kld": float(kld.max()),
        "max_kld": p["max_kld"],
        "checks": [
            {"metric": "gguf_tokenizer_mismatches", "value": tokenizer["mismatches"], "op": "<=", "threshold": 0,
             "passed": tokenizer["mismatches"] == 0},
            {"metric": "gguf_f16_mean_kld", "value": mean_kld, "op": "<=", "threshold": p["max_kld"],
             "passed": mean_kld <= p["max_kld"]},
        ],
    }

