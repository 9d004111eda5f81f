"""The comparison metrics, vectorised over a window of positions.

The baseline's side of every comparison is computed once and cached, in one of two forms:

- **full** (default): every scored token's complete log-probability vector, stored in fp16.
  KL(P_base || P_variant) is then exact up to that rounding (renormalised on load; the error it
  adds is far below 0.1% of the KLD, pinned in tests). Costs ``2 × vocab`` bytes per token.
- **top-k**: the baseline's k most likely tokens (log-probs and ids). KL is summed exactly over
  them and the rest of both distributions is compared as one bucket. Merging outcomes can only
  lower a KL divergence (log-sum inequality), so this is a lower bound, exact when k covers the
  vocabulary. It is cheap but can be loose: on SmolLM2-135M over WikiText-2 the baseline leaves
  8.9% of its mass outside its top 256 tokens and top-256 KLD read 87% of the exact value
  (94% at k=1024, 98.5% at k=4096). Use it only where full vectors do not fit.

Perplexity and top-1 agreement are exact in both forms.
"""

from __future__ import annotations

import math

_TAIL_FLOOR = 1e-6


def reference_full(logprobs, targets):
    """The baseline's side in full form.

    The stored fp16 log-probs are what comparisons read back, so the per-token constants of
    KL(P || Q) = sum p log p - sum p log q are computed here from those fp16 values: their
    normaliser (``lse16``) and the negative entropy (``negentropy``). A variant then costs one
    exp and one dot product per token.

    Args:
        logprobs: ``[positions, vocab]`` fp32 log-softmax of the baseline's logits.
        targets: ``[positions]`` the actual next tokens.

    Returns:
        ``(per_position, logprobs16)`` where ``per_position`` maps ``target_logprob``, ``top1``
        (int32), ``lse16`` and ``negentropy`` to ``[P]`` tensors and ``logprobs16`` is
        ``[P, vocab]`` fp16.
    """
    import torch

    lp16 = logprobs.to(torch.float16)
    restored = lp16.float()
    # Log-probs are <= 0 (up to fp16 rounding), so exp needs no max-shift: one exp, one sum and
    # one dot product give both the normaliser and sum p log p.
    e = restored.exp()
    total = e.sum(-1)
    lse16 = total.log()
    negentropy = torch.linalg.vecdot(e, restored) / total - lse16
    return {
        "target_logprob": logprobs.gather(-1, targets[:, None])[:, 0],
        "top1": logprobs.argmax(-1).to(torch.int32),
        "lse16": lse16,
        "negentropy": negentropy,
    }, lp16


def compare_full(var_logprobs, targets, base_logprobs16, base, buffer=None):
    """Per-position metrics of a variant against the baseline's full (fp16) distributions.

    Args:
        var_logprobs: ``[P, vocab]`` fp32 log-softmax of the variant.
        targets: ``[P]`` next tokens.
        base_logprobs16: ``[P, vocab]`` the stored baseline log-probs.
        base: the baseline's per-position tensors from ``reference_full``.
        buffer: optional reusable fp32 ``[P, vocab]`` scratch tensor (saves a large allocation
            per window).

    Returns:
        ``(target_logprob [P], kld [P], same_top1 [P] bool)``.
    """
    import torch

    p = buffer if buffer is not None and buffer.shape == base_logprobs16.shape else torch.empty(
        base_logprobs16.shape, dtype=torch.float32)
    # sum_i p_i log q_i with p_i = exp(l16_i - lse16): the normaliser comes out of the sum.
    p.copy_(base_logprobs16).exp_()
    cross = torch.linalg.vecdot(p, var_logprobs) * torch.exp(-base["lse16"])
    kld = (base["negentropy"] - cross).clamp_min(0.0)
    target_lp = var_logprobs.gather(-1, targets[:, None])[:, 0]
    same_top1 = var_logprobs.argmax(-1) == base["top1"].long()
    return target_lp, kld, same_top1


def reference_topk(logprobs, targets, top_k: int):
    """The baseline's side in top-k form.

    Returns:
        ``(target_logprob [P], topk_logprobs [P, k], topk_ids [P, k] int32)``.
    """
    import torch

    k = min(top_k, logprobs.shape[-1])
    values, ids = logprobs.topk(k, dim=-1)
    return logprobs.gather(-1, targets[:, None])[:, 0], values, ids.to(torch.int32)


def compare_topk(var_logprobs, targets, base_topk_logprobs, base_topk_ids):
    """Per-position metrics of a variant against the baseline's top-k (KLD is a lower bound).

    Returns:
        ``(target_logprob [P], kld [P], same_top1 [P] bool)``.
    """
    import torch

    ids = base_topk_ids.long()
    q_top = var_logprobs.gather(-1, ids)
    p_top = base_topk_logprobs.exp()
    head = (p_top * (base_topk_logprobs - q_top)).sum(-1)
    # Tail masses in float64: they are differences from 1. A mass below _TAIL_FLOOR is within the
    # rounding of an fp32 log-softmax (it is what k = vocabulary leaves) and counts as zero.
    p_tail = (1.0 - p_top.double().sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - q_top.double().exp().sum(-1)).clamp_min(1e-30)
    tail = torch.where(
        p_tail > _TAIL_FLOOR, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), torch.zeros_like(p_tail)
    )
    kld = (head.double() + tail).clamp_min(0.0).float()
    target_lp = var_logprobs.gather(-1, targets[:, None])[:, 0]
    same_top1 = var_logprobs.argmax(-1) == ids[:, 0]
    return target_lp, kld, same_top1


def summarise(target_logprob, kld, same_top1, baseline_ppl: float) -> dict[str, float]:
    """Aggregate per-token arrays into the reported metrics."""
    import torch

    nll = -target_logprob.double().mean().item()
    ppl = math.exp(nll)
    return {
        "ppl": ppl,
        "ppl_ratio": ppl / baseline_ppl,
        "mean_kld": kld.double().mean().item(),
        "p99_kld": torch.quantile(kld.double(), 0.99).item(),
        "top1": same_top1.double().mean().item(),
        "tokens_scored": int(kld.numel()),
    }


def perplexity(target_logprob) -> float:
    return math.exp(-target_logprob.double().mean().item())
