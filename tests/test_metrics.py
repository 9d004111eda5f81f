"""The comparison metrics against straightforward full-vocabulary formulas."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.quality.metrics import baseline_side, compare, summarise


def _dists(positions=200, vocab=2000, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(positions, vocab, generator=g) * 3
    var = base + noise * torch.randn(positions, vocab, generator=g)
    targets = torch.randint(0, vocab, (positions,), generator=g)
    return base.log_softmax(-1), var.log_softmax(-1), targets


def _full_kld(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def test_topk_equal_vocab_is_exact():
    p, q, t = _dists()
    _, top_lp, top_ids = baseline_side(p, t, top_k=p.shape[-1])
    _, kld, _ = compare(q, t, top_lp, top_ids)
    torch.testing.assert_close(kld, _full_kld(p, q), rtol=1e-3, atol=2e-5)


def test_topk_is_a_tight_lower_bound():
    p, q, t = _dists()
    _, top_lp, top_ids = baseline_side(p, t, top_k=256)
    _, kld, _ = compare(q, t, top_lp, top_ids)
    full = _full_kld(p, q)
    assert torch.all(kld <= full + 1e-6)
    assert kld.mean().item() == pytest.approx(full.mean().item(), rel=0.05)


def test_identical_distributions_score_zero_and_full_agreement():
    p, _, t = _dists()
    target_lp, top_lp, top_ids = baseline_side(p, t, top_k=64)
    lp, kld, same = compare(p, t, top_lp, top_ids)
    assert kld.abs().max().item() < 1e-6
    assert bool(same.all())
    torch.testing.assert_close(lp, target_lp)
    m = summarise(lp, kld, same, baseline_ppl=math.exp(-target_lp.double().mean().item()))
    assert m["ppl_ratio"] == pytest.approx(1.0)
    assert m["top1"] == 1.0 and m["tokens_scored"] == 200


def test_summary_matches_definitions():
    p, q, t = _dists(noise=1.0)
    _, top_lp, top_ids = baseline_side(p, t, top_k=2000)
    lp, kld, same = compare(q, t, top_lp, top_ids)
    m = summarise(lp, kld, same, baseline_ppl=10.0)
    nll = -q.gather(-1, t[:, None]).double().mean().item()
    assert m["ppl"] == pytest.approx(math.exp(nll))
    assert m["ppl_ratio"] == pytest.approx(math.exp(nll) / 10.0)
    assert m["top1"] == pytest.approx((q.argmax(-1) == p.argmax(-1)).double().mean().item())
    assert m["p99_kld"] == pytest.approx(torch.quantile(_full_kld(p, q).double(), 0.99).item(), rel=1e-3)
