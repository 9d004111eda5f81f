"""The report's two plots as PNG bytes (matplotlib, Agg: no display, no network).

Each point is a variant, labelled; the Pareto frontier is drawn as a step line and its points
filled. Mean KLD is on a log axis when every value is positive (variants span 1e-4 to ~1).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from pipeline.report.pareto import frontier


def scatter_png(points: Sequence[tuple[str, float, float]], *, x_label: str, y_label: str, title: str,
                minimise_y: bool = True) -> bytes:
    """``points``: (label, mean KLD, y). The frontier minimises KLD and y (or maximises y)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.2), dpi=110)
    ax = fig.subplots()
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    on = set(frontier([(x, y if minimise_y else -y) for x, y in zip(xs, ys)]))
    ax.scatter([x for i, x in enumerate(xs) if i not in on], [y for i, y in enumerate(ys) if i not in on],
               s=36, facecolors="none", edgecolors="#6b7280", label="dominated")
    ax.scatter([xs[i] for i in on], [ys[i] for i in on], s=44, color="#dc2626", zorder=3, label="Pareto frontier")
    ordered = sorted(on, key=lambda i: xs[i])
    if len(ordered) > 1:
        ax.step([xs[i] for i in ordered], [ys[i] for i in ordered], where="post", color="#dc2626", linewidth=1.2)
    for (label, x, y) in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="#111827")
    if xs and min(xs) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
