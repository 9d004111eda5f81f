"""The Pareto frontier of variants over two figures to minimise (e.g. size and mean KLD)."""

from __future__ import annotations

from collections.abc import Sequence


def frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (as small or smaller in both coordinates
    and strictly smaller in one), sorted by the first coordinate. Equal points are all kept."""
    keep = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (a <= x and b <= y) and (a < x or b < y) for j, (a, b) in enumerate(points) if j != i
        )
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (points[i][0], points[i][1]))
