"""Quality measurement: eval corpora, forward passes, and the metrics that compare a variant with
its baseline (perplexity, KL divergence of next-token distributions, top-1 agreement)."""
