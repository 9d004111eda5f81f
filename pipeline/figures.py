"""How measured figures are printed, the same in reports, model cards and the CLI."""

from __future__ import annotations

from typing import Any

NOT_MEASURED = "not measured"


def kld(v: Any) -> str:
    """A KLD: 4 decimals, or 3 significant digits below 0.001 (so 3e-05 does not read "0.0000")."""
    if not isinstance(v, (int, float)):
        return NOT_MEASURED
    return f"{v:.4f}" if v == 0 or v >= 1e-3 else f"{v:.2e}"
