"""baseline: score the unquantized model once and keep what every comparison needs.

Stored per scored token: the log-prob of the actual next token and the top-k log-probs with
their ids (``reference.safetensors``), plus the token windows themselves so every variant is
scored on exactly the same ids.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.quality.corpus import read_text, token_windows
from pipeline.quality.metrics import baseline_side, perplexity
from pipeline.quality.runner import window_logprobs

REFERENCE = "reference.safetensors"


def run(ctx, stage, inputs, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file
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

    target_lp, top_lp, top_ids = [], [], []
    started = time.perf_counter()
    with ctx.reporter.steps("baseline forward", windows.shape[0]) as advance:
        for logprobs, targets in window_logprobs(model, windows, ctx.device, on_window=lambda _i: advance(1)):
            t, v, i = baseline_side(logprobs, targets, ev.top_k)
            target_lp.append(t)
            top_lp.append(v)
            top_ids.append(i)
    forward_s = time.perf_counter() - started
    target = torch.stack(target_lp)
    save_file(
        {
            "tokens": windows.contiguous(),
            "target_logprob": target.contiguous(),
            "topk_logprobs": torch.stack(top_lp).contiguous(),
            "topk_ids": torch.stack(top_ids).contiguous(),
        },
        str(out / REFERENCE),
    )
    return {
        "ppl": perplexity(target),
        "tokens_scored": int(target.numel()),
        "windows": int(windows.shape[0]),
        "vocab": int(model.config.vocab_size),
        "top_k": int(top_lp[0].shape[-1]),
        "device": ctx.device,
        "forward_seconds": round(forward_s, 3),
    }
