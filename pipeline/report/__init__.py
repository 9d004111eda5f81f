"""The tradeoff report: what the pipeline measured, per published variant, as tables, Pareto
plots and per-target recommendations (``modelbuild report``).

``data`` reads rows from a store (registry index + manifests), ``pareto`` marks the frontier,
``recommend`` picks a variant per target with ``select``'s logic, ``plots`` draws the PNGs and
``render`` writes Markdown and one self-contained HTML page.
"""
