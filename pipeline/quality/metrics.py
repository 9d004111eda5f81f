"""The comparison metrics, vectorised over a window of positions.

The baseline keeps, per scored token, its top-k log-probabilities and their token ids. KL
divergence KL(P_base || P_variant) is summed exactly over those k tokens, and the remaining
probability mass of both distributions is compared as one bucket. Grouping outcomes can only
lower a KL divergence (log-sum inequality), so this is a lower bound that is exact when k covers
the vocabulary; with k=256 the tail holds a tiny share of mass (tests pin the gap on a real
vocabulary).
"""

from __future__ import annotations

import math

_TAIL_FLOOR = 1e-6


def baseline_side(logprobs, targets, top_k: int):
    """What the baseline contributes once, for every later comparison.

    Args:
        logprobs: ``[positions, vocab]`` log-softmax of the baseline's logits.
        targets: ``[positions]`` the actual next tokens.
        top_k: how many of the baseline's most likely tokens to keep.

    Returns:
        ``(target_logprob [P], topk_logprobs [P, k], topk_ids [P, k] int32)``.
    """
    import torch

    k = min(top_k, logprobs.shape[-1])
    values, ids = logprobs.topk(k, dim=-1)
    return logprobs.gather(-1, targets[:, None])[:, 0], values, ids.to(torch.int32)


def compare(var_logprobs, targets, base_topk_logprobs, base_topk_ids):
    """Per-position metrics of a variant against the stored baseline side.

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
