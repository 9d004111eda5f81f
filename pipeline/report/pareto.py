"""The Pareto frontier of variants over two figures to minimise (e.g. size and mean KLD), over all
variants or per serving engine (a user bound to one engine chooses among what it loads)."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline import engines


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


def frontiers_by_engine(points: Sequence[tuple[float, float]], loaded_by: Sequence[Sequence[str]]) -> dict[str, list[int]]:
    """For each engine of the catalogue that loads at least one point (``loaded_by[i]``: the
    engines that load point i), the indices of its frontier among the points it loads, sorted by
    the first coordinate. Engines are in the catalogue's order."""
    out: dict[str, list[int]] = {}
    for engine in (e.id for e in engines.CATALOGUE):
        mine = [i for i, ids in enumerate(loaded_by) if engine in ids]
        if mine:
            out[engine] = [mine[k] for k in frontier([points[i] for i in mine])]
    return out
