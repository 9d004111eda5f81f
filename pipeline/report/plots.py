"""The report's two plots as PNG bytes (matplotlib, Agg: no display, no network).

Each point is a variant, labelled. A user serves with one engine, so each engine gets its own
Pareto frontier over the variants it loads (a step line in the engine's colour, its points filled);
a variant several engines load can sit on several frontiers. Mean KLD is on a log axis when every
value is positive (variants span 1e-7 to ~1). Variants crowd where formats share a size (the
demo's 4-bit ones around 0.12 GB, its 8-bit ones around 0.17 GB), so labels are moved apart by
adjustText, each tied to its point by a thin line, until no two overlap.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from pipeline import engines
from pipeline.report.pareto import frontiers_by_engine

# One colour per engine (colour-blind-safe, from the Okabe-Ito palette).
ENGINE_COLOURS = {"vllm": "#0072B2", "trtllm": "#009E73", "trtllm-engine": "#CC79A7", "llamacpp": "#D55E00"}
# adjustText is a heuristic; here it stops on iterations, never on a clock, so the same rows give
# the same picture on any machine. The settings are tried in turn until no two labels overlap and
# every label is inside the axes: on the demo's 28 variants the first does (a test measures the
# rendered boxes); the stronger second is for denser reports.
LABEL_ATTEMPTS: tuple[dict, ...] = (
    {"iter_lim": 1000},
    {"iter_lim": 2000, "expand": (1.2, 1.6), "force_text": (0.5, 1.0), "force_explode": (0.3, 1.0)},
)

Point = tuple[str, float, float, Sequence[str]]  # (label, mean KLD, y, the engines that load it)


def scatter_figure(points: Sequence[Point], *, x_label: str, y_label: str, title: str, minimise_y: bool = True):
    """The plot as a matplotlib ``Figure``: each engine's frontier minimises KLD and y (or
    maximises y) over its own points; of the label placements tried, the first without
    collisions, else the one with the fewest."""
    best = None
    for attempt in LABEL_ATTEMPTS:
        fig = _draw(points, x_label=x_label, y_label=y_label, title=title, minimise_y=minimise_y, labels=attempt)
        score = label_collisions(fig)
        if best is None or score < best[0]:
            best = (score, fig)
        if score == (0, 0):
            break
    assert best is not None
    return best[1]


def scatter_png(points: Sequence[Point], **kw) -> bytes:
    """:func:`scatter_figure` as PNG bytes."""
    buf = io.BytesIO()
    scatter_figure(points, **kw).savefig(buf, format="png")
    return buf.getvalue()


def label_collisions(fig) -> tuple[int, int]:
    """(pairs of labels whose rendered boxes overlap, labels not wholly inside the axes)."""
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    pairs = sum(1 for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j]))
    outside = sum(1 for b in boxes if not (ax.bbox.contains(b.x0, b.y0) and ax.bbox.contains(b.x1, b.y1)))
    return pairs, outside


def _draw(points: Sequence[Point], *, x_label: str, y_label: str, title: str, minimise_y: bool, labels: dict):
    import matplotlib

    matplotlib.use("Agg")
    from adjustText import adjust_text
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), dpi=110)
    FigureCanvasAgg(fig)  # a renderer to measure the labels with (no display)
    ax = fig.subplots()
    xs = [p[1] for p in points]
    ys = [p[2] for p in points]
    if xs and min(xs) > 0:
        ax.set_xscale("log")
    on_a_frontier: set[int] = set()
    fronts = frontiers_by_engine([(x, y if minimise_y else -y) for x, y in zip(xs, ys)], [p[3] for p in points])
    for engine, best in fronts.items():
        colour = ENGINE_COLOURS.get(engine, "#374151")
        ax.step([xs[i] for i in best], [ys[i] for i in best], where="post", color=colour, linewidth=1.2, alpha=0.8)
        ax.scatter([xs[i] for i in best], [ys[i] for i in best], s=44, color=colour, zorder=3,
                   label=f"{engines.display(engine)} frontier")
        on_a_frontier |= set(best)
    rest = [i for i in range(len(points)) if i not in on_a_frontier]
    if rest:
        ax.scatter([xs[i] for i in rest], [ys[i] for i in rest], s=36, facecolors="none", edgecolors="#6b7280",
                   label="dominated in every engine that loads it")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    if points:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    texts = [ax.text(x, y, label, fontsize=7, color="#111827") for (label, x, y, _) in points]
    if texts:
        adjust_text(texts, x=xs, y=ys, ax=ax, time_lim=None,
                    arrowprops={"arrowstyle": "-", "color": "#9ca3af", "lw": 0.5}, **labels)
    return fig
