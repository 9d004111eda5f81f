"""baseline: score the unquantized model once and keep what every comparison needs.

See ``pipeline.quality.reference`` for what is stored. The token windows are stored too, so
every variant is scored on exactly the same ids.

Two plausibility bounds refuse an absurd baseline (``pipeline.sources.tokenizer_check``): the
tokenizer must not cut the eval text into single characters (checked before the forward pass),
and the perplexity must be below twice the vocabulary size (a uniform guess scores exactly the
vocabulary size).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.quality.corpus import read_text, token_windows
from pipeline.quality.reference import write_reference
from pipeline.quality.streamed import load_offloaded, streamed_logprobs
from pipeline.sources import tokenizer_check
from pipeline.stages.context import StageInput

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext

# The granularity check reads this much of the eval text: thousands of tokens, a stable ratio.
_SAMPLE_CHARS = 20_000


class Inputs(TypedDict):
    checkpoint: StageInput  # the fetched model


class Result(TypedDict):
    """What ``pipeline.quality.reference.write_reference`` says of the stored reference, and how
    it was computed."""

    ppl: float
    tokens_scored: int
    windows: int
    vocab: int
    form: str
    top_k: int | None
    eval_granularity: dict[str, Any]
    device: str
    forward_seconds: float


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    import torch
    from transformers import AutoTokenizer

    ev = ctx.recipe.eval
    checkpoint = inputs["checkpoint"].data
    trust = ctx.recipe.source.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust)
    text = read_text(ev.corpus, what="eval.corpus")
    windows = token_windows(text, tokenizer, tokens=ev.tokens, seq_len=ev.seq_len, where="eval.corpus")
    # After the windows (a corpus too short is reported as such), before the forward pass.
    granularity = tokenizer_check.check_granularity(text[:_SAMPLE_CHARS], tokenizer, what="the eval text",
                                                    where="baseline")
    # Scratch beside the entry being written: on the cache's disk, and gone with it if the run dies.
    device = ctx.compute_device(stage)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix="scratch-") as folder:
        scratch = Path(folder)
        model, weights = load_offloaded(checkpoint, dtype=torch.float32, device=device, offload_folder=scratch,
                                        trust_remote_code=trust)
        started = time.perf_counter()
        with ctx.reporter.steps("baseline forward", windows.shape[0]) as advance:
            scored = streamed_logprobs(model.eval(), windows, device, weights, scratch=scratch)
            facts = write_reference(out, scored, windows, vocab=int(model.config.vocab_size), top_k=ev.top_k,
                                    advance=advance)
    tokenizer_check.check_baseline_perplexity(facts["ppl"], facts["vocab"], where="baseline")
    return {"ppl": facts["ppl"], "tokens_scored": facts["tokens_scored"], "windows": facts["windows"],
            "vocab": facts["vocab"], "form": facts["form"], "top_k": facts["top_k"], "eval_granularity": granularity,
            "device": device, "forward_seconds": round(time.perf_counter() - started, 3)}
