"""baseline: score the unquantized model once and keep what every comparison needs.

See ``pipeline.quality.reference`` for what is stored. The token windows are stored too, so
every variant is scored on exactly the same ids.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.quality.corpus import read_text, token_windows
from pipeline.quality.reference import write_reference


def run(ctx, stage, inputs, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ev = ctx.recipe.eval
    checkpoint = inputs["fetch"].data
    trust = ctx.recipe.source.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust)
    windows = token_windows(
        read_text(ev.corpus, what="eval.corpus"), tokenizer, tokens=ev.tokens, seq_len=ev.seq_len, where="eval.corpus"
    )
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, trust_remote_code=trust)
    model.to(ctx.device).eval()
    started = time.perf_counter()
    with ctx.reporter.steps("baseline forward", windows.shape[0]) as advance:
        facts = write_reference(out, model, windows, top_k=ev.top_k, device=ctx.device, advance=advance)
    return {**facts, "device": ctx.device, "forward_seconds": round(time.perf_counter() - started, 3)}
