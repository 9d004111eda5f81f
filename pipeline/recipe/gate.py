"""Quality gates: thresholds a variant must meet to be published."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field


class Gate(BaseModel):
    """Quality thresholds a variant must meet to be published; unset means unchecked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_ppl_ratio: float | None = Field(None, ge=1.0, le=100.0, description="variant PPL / baseline PPL")
    max_kld: float | None = Field(None, ge=0.0, le=100.0, description="mean KL(baseline || variant), nats")
    max_p99_kld: float | None = Field(None, ge=0.0, le=100.0, description="99th percentile per-token KLD")
    min_top1: float | None = Field(None, ge=0.0, le=1.0, description="share of tokens with the same argmax")

    def merged(self, override: Gate | None) -> Gate:
        if override is None:
            return self
        return Gate(**{**self.model_dump(), **override.model_dump(exclude_none=True)})


    def check(self, metrics: dict[str, float]) -> list[dict]:
        """Compare measured metrics with every set threshold.

        Returns:
            One ``{metric, value, op, threshold, passed}`` per set threshold. A metric that is
            missing or not finite fails its check.
        """
        results = []
        for field, metric, op in _CHECKS:
            threshold = getattr(self, field)
            if threshold is None:
                continue
            value = metrics.get(metric)
            ok = value is not None and math.isfinite(value)
            if ok:
                ok = value <= threshold if op == "<=" else value >= threshold
            results.append(
                {"metric": metric, "value": value, "op": op, "threshold": threshold, "passed": bool(ok)}
            )
        return results


# (gate field, metric name, comparison that passes)
_CHECKS = (
    ("max_ppl_ratio", "ppl_ratio", "<="),
    ("max_kld", "mean_kld", "<="),
    ("max_p99_kld", "p99_kld", "<="),
    ("min_top1", "top1", ">="),
)
