"""The comparison metrics against straightforward full-vocabulary formulas."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.quality.metrics import compare_full, compare_topk, reference_full, reference_topk, summarise


def _dists(positions=200, vocab=2000, noise=0.3, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(positions, vocab, generator=g) * spread
    var = base + noise * torch.randn(positions, vocab, generator=g)
    targets = torch.randint(0, vocab, (positions,), generator=g)
    return base.log_softmax(-1), var.log_softmax(-1), targets


def _full_kld(p_log, q_log):
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def test_full_form_is_exact_up_to_fp16_storage():
    # Flat distributions (a small model on hard text) are where any shortcut shows most.
    p, q, t = _dists(vocab=49152, positions=64, spread=1.5)
    rows, lp16 = reference_full(p, t)
    target = rows["target_logprob"]
    assert lp16.dtype == torch.float16
    lp, kld, same = compare_full(q, t, lp16, rows)
    exact = _full_kld(p.double(), q.double()).float()
    assert kld.mean().item() == pytest.approx(exact.mean().item(), rel=1e-3)
    torch.testing.assert_close(kld, exact, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(lp, q.gather(-1, t[:, None])[:, 0])
    assert torch.equal(same, q.argmax(-1) == p.argmax(-1))
    torch.testing.assert_close(target, p.gather(-1, t[:, None])[:, 0])


def test_topk_equal_vocab_is_exact():
    p, q, t = _dists()
    _, top_lp, top_ids = reference_topk(p, t, top_k=p.shape[-1])
    _, kld, _ = compare_topk(q, t, top_lp, top_ids)
    torch.testing.assert_close(kld, _full_kld(p, q), rtol=1e-3, atol=2e-5)


def test_topk_is_a_lower_bound_that_tightens_with_k():
    p, q, t = _dists(spread=1.5)
    full = _full_kld(p, q)
    previous = 0.0
    for k in (16, 256, 1024, 2000):
        _, top_lp, top_ids = reference_topk(p, t, top_k=k)
        _, kld, _ = compare_topk(q, t, top_lp, top_ids)
        assert torch.all(kld <= full + 1e-5)
        assert kld.mean().item() >= previous - 1e-6
        previous = kld.mean().item()
    assert previous == pytest.approx(full.mean().item(), rel=1e-3)


@pytest.mark.parametrize("form", ["full", "topk"])
def test_identical_distributions_score_zero_and_full_agreement(form):
    p, _, t = _dists()
    if form == "full":
        rows, lp16 = reference_full(p, t)
        target_lp = rows["target_logprob"]
        lp, kld, same = compare_full(p, t, lp16, rows)
        assert kld.abs().max().item() < 1e-3  # fp16 storage of the baseline only
    else:
        target_lp, top_lp, top_ids = reference_topk(p, t, top_k=64)
        lp, kld, same = compare_topk(p, t, top_lp, top_ids)
        assert kld.abs().max().item() < 1e-6
    assert bool(same.all())
    torch.testing.assert_close(lp, target_lp)
    m = summarise(lp, kld, same, baseline_ppl=math.exp(-target_lp.double().mean().item()))
    assert m["ppl_ratio"] == pytest.approx(1.0)
    assert m["top1"] == 1.0 and m["tokens_scored"] == 200


def test_summary_matches_definitions():
    p, q, t = _dists(noise=1.0)
    rows, lp16 = reference_full(p, t)
    lp, kld, same = compare_full(q, t, lp16, rows, buffer=torch.empty(lp16.shape))
    m = summarise(lp, kld, same, baseline_ppl=10.0)
    nll = -q.gather(-1, t[:, None]).double().mean().item()
    assert m["ppl"] == pytest.approx(math.exp(nll))
    assert m["ppl_ratio"] == pytest.approx(math.exp(nll) / 10.0)
    assert m["top1"] == pytest.approx((q.argmax(-1) == p.argmax(-1)).double().mean().item())
    assert m["mean_kld"] == pytest.approx(_full_kld(p, q).double().mean().item(), rel=1e-3)
    assert m["p99_kld"] == pytest.approx(torch.quantile(_full_kld(p, q).double(), 0.99).item(), rel=1e-2)
