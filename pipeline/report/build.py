"""Assemble a model's report from a store and write it (Markdown, HTML, the PNGs, the data as JSON)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from pipeline import engines
from pipeline.recipe.schema import FAST_MAX_KLD
from pipeline.report.data import collect
from pipeline.report.estimate import MODEL
from pipeline.report.plots import scatter_png
from pipeline.report.recommend import Target, default_targets, recommend
from pipeline.report.render import Report, html_page, markdown
from pipeline.storage.base import Storage
from pipeline.storage.consume import latest_entries
from pipeline.storage.registry import read_index


def build_report(storage: Storage, model: str, targets: list[Target] | None = None, gpus: list[str] | None = None,
                 fast_max_kld: float = FAST_MAX_KLD) -> Report:
    """The report of ``model``'s variants in ``storage``: recommendations for ``targets`` (default:
    ``default_targets`` on the recipe's ``gpus``), speeds estimated on every GPU named by either."""
    index = read_index(storage)
    present = {engines.canonical(e) or e for entry in latest_entries(index, model) for e in entry.get("engines", [])}
    if targets is None:
        targets = default_targets(present, gpus or [])
    estimated_on = tuple(dict.fromkeys([*(gpus or []), *(t.gpu for t in targets if t.gpu.lower() != "cpu")])) or ("H100",)
    rows = collect(storage, model, estimated_on)
    rows.sort(key=lambda r: (r.engines, r.metrics.get("mean_kld") is None, r.metrics.get("mean_kld") or 0.0, r.variant))
    recs = recommend(index, model, targets, rows, fast_max_kld)
    rep = Report(model=model, storage=storage.url, generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 rows=rows, recommendations=recs)

    sized = [(r.variant, mean_kld, r.size_bytes / 1e9, r.engines) for r in rows
             if (mean_kld := r.metrics.get("mean_kld")) is not None and isinstance(r.size_bytes, int)]
    if sized:
        rep.plots["size_vs_kld.png"] = (
            "Size on disk vs mean KLD to the baseline (lower left is better; a Pareto frontier per engine)",
            scatter_png(sized, x_label="mean KLD vs the unquantized baseline", y_label="size on disk (GB)",
                        title=f"{model}: size vs quality"))
    fast = [(r.variant, mean_kld, r.speed["tg_tps"], r.engines) for r in rows
            if (mean_kld := r.metrics.get("mean_kld")) is not None and r.speed and r.speed.get("tg_tps")]
    if fast:
        hw = sorted({r.speed["hardware"] for r in rows if r.speed})
        rep.plots["speed_vs_kld.png"] = (
            f"Generation speed vs mean KLD (upper left is better; a Pareto frontier per engine); measured on {', '.join(hw)}",
            scatter_png(fast, x_label="mean KLD vs the unquantized baseline", y_label="generation tokens/s",
                        title=f"{model}: speed vs quality", minimise_y=False))
    estimated = [r.variant for r in rows if any(e.decode_tps or e.prefill_tps for e in r.estimates.values())]
    if estimated:
        rep.notes.append(f"Speed estimated, not measured, for {len(estimated)} variant(s) ({', '.join(estimated)}) on "
                         f"{', '.join(estimated_on)}: their engines need a GPU and no GPU stage ran them. The "
                         f"{MODEL}. Small models decode slower than the bandwidth bound (kernel launches dominate), "
                         "so for them these are upper bounds. The speed plot shows measured variants only.")
        uncertain = sorted({g for r in rows for g, e in r.estimates.items() if e.uncertain})
        if uncertain:
            rep.notes.append(f"The figures of {', '.join(uncertain)} are not confirmed against a datasheet "
                             "(pipeline/hardware.py names their sources).")
    unmeasured = [r for r in rows if r.speed is None and r.variant not in estimated]
    if unmeasured:
        why = sorted({e.why_not for r in unmeasured for e in r.estimates.values() if e.why_not})
        rep.notes.append(f"Speed not measured for {len(unmeasured)} variant(s) ({', '.join(r.variant for r in unmeasured)})"
                         f", nor estimated{': ' + '; '.join(why) if why else ''}.")
    busy = [f"{r.variant} ({load['other_cores']:.2f} cores, {load['attempts']} attempts)" for r in rows
            if r.speed and (load := r.speed.get("load") or {}).get("busy")]
    if busy:
        rep.notes.append(f"Speed measured while other processes kept the machine busy, even at the quietest of "
                         f"the attempts: {', '.join(busy)}. These figures are below this machine's own speed.")
    incomplete = [r.variant for r in rows if r.missing_metrics]
    if incomplete:
        rep.notes.append(f"Metrics missing for {', '.join(incomplete)} (marked in the table; left out of the plots).")
    return rep


def write_report(rep: Report, out_dir: Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html``, the PNGs and ``report.json`` into ``out_dir``, all at
    once: files go to a temporary folder beside it, which replaces ``out_dir`` only when complete."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "report.md").write_text(markdown(rep), encoding="utf-8")
        (tmp / "report.html").write_text(html_page(rep), encoding="utf-8")
        for name, (_caption, png) in rep.plots.items():
            (tmp / name).write_bytes(png)
        data = {"model": rep.model, "storage": rep.storage, "generated": rep.generated, "notes": rep.notes,
                "rows": [{k: v for k, v in asdict(r).items() if k != "manifest"} for r in rep.rows],
                "recommendations": [{"target": r.target.label, "variant": r.variant, "reason": r.reason,
                                     "fastest": r.fastest, "fastest_reason": r.fastest_reason}
                                    for r in rep.recommendations]}
        (tmp / "report.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {p.name: p for p in sorted(out_dir.iterdir())}
