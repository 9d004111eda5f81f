"""Markdown and a self-contained HTML page (inline CSS, PNGs as data: URIs, no scripts, nothing
fetched) from the report's rows, plots and recommendations."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

from pipeline import engines as catalogue
from pipeline.figures import NOT_MEASURED, kld
from pipeline.report.data import Row
from pipeline.report.recommend import Recommendation


@dataclass
class Report:
    model: str
    storage: str
    generated: str
    rows: list[Row]
    recommendations: list[Recommendation]
    plots: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # file name -> (caption, PNG)
    notes: list[str] = field(default_factory=list)


# -- cells --------------------------------------------------------------------------------------


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else NOT_MEASURED


def engines(row: Row) -> str:
    return ", ".join(catalogue.display(e) for e in row.engines) or "—"


def cpu_only(row: Row) -> bool:
    """Whether every engine that loads the row's variant runs on a CPU (llama.cpp's GGUF)."""
    return bool(row.engines) and all(e in catalogue.CPU_IDS for e in row.engines)


def fmt_name(row: Row) -> str:
    family = {"gguf": "GGUF", "compressed-tensors": "compressed-tensors"}.get(row.format or "", row.format or "?")
    return f"{family} {row.scheme}" if row.scheme else family


def min_gpu(row: Row) -> str:
    if cpu_only(row):
        return "none (CPU)"
    cc = row.min_compute_capability
    return "—" if cc is None else f"sm {cc:g}+"


def size_gb(row: Row) -> str:
    return f"{row.size_bytes / 1e9:.3f} GB" if isinstance(row.size_bytes, int) else NOT_MEASURED


def gate(row: Row) -> str:
    return {True: "passed", False: "failed", None: NOT_MEASURED}[row.gate_passed]


def speed_cell(row: Row, key: str) -> str:
    """Measured: the median (min-max of the repetitions); else the estimates per GPU, so labelled."""
    s = row.speed
    if s is None:
        field = "prefill_tps" if key == "pp" else "decode_tps"
        shown = [f"est. {getattr(e, field):,.0f} ({gpu})" for gpu, e in row.estimates.items() if getattr(e, field)]
        return "; ".join(shown) or NOT_MEASURED
    if s.get(f"{key}_tps") is None:
        return NOT_MEASURED
    spread = s.get(f"{key}_range")
    return f"{s[f'{key}_tps']:.1f}" + (f" ({spread[0]:.1f}–{spread[1]:.1f})" if spread else "")


def hardware(row: Row) -> str:
    s = row.speed
    if s is None:
        if row.estimates:
            return f"estimate for {', '.join(row.estimates)} (not measured: the model is in the notes)"
        gpu = "the CPU" if cpu_only(row) else "a GPU"
        return f"{NOT_MEASURED} (needs {engines(row)} on {gpu})"
    threads = f", {s['threads']} threads" if s.get("threads") else ""
    runs = f", median of {s['repetitions']}" if s.get("repetitions") else ""
    load = s.get("load") or {}
    quiet = ""
    if load.get("other_cores") is not None:
        quiet = (f"; BUSY: others used {load['other_cores']:.2f} cores" if load.get("busy")
                 else f"; others used {load['other_cores']:.2f} cores")
    return (f"{s['hardware']}{threads} ({s.get('tool') or 'bench'}: pp{s.get('pp_tokens')}, tg{s.get('tg_tokens')}"
            f"{runs}{quiet})")


def quality(row: Row) -> str:
    m = row.metrics
    if m.get("mean_kld") is None and m.get("ppl_ratio") is None:
        return NOT_MEASURED
    parts = []
    if m.get("ppl_ratio") is not None:
        parts.append(f"PPL ×{m['ppl_ratio']:.3f}")
    if m.get("mean_kld") is not None:
        parts.append(f"KLD {kld(m['mean_kld'])}")
    top1 = m.get("top1")
    if top1 is not None:
        parts.append(f"top-1 {top1 * 100:.1f}%")
    return ", ".join(parts)


def speedup(row: Row) -> str:
    if row.speedup is None and row.estimates:
        gpu, est = next(iter(row.estimates.items()))
        ref = row.reference_estimates.get(gpu)
        parts = [f"{k} ×{mine / theirs:.2f}" for k, mine, theirs in
                 (("decode", est.decode_tps, ref and ref.decode_tps), ("prefill", est.prefill_tps, ref and ref.prefill_tps))
                 if mine and theirs]
        return f"est. {', '.join(parts)} vs 16-bit on {gpu}" if parts else NOT_MEASURED
    if row.speedup is None:
        if row.speed is not None:
            return f"{NOT_MEASURED} (no unquantized {engines(row)} reference on this hardware)"
        return NOT_MEASURED if cpu_only(row) else f"{NOT_MEASURED} (needs {engines(row)} on a GPU)"
    if row.speedup["reference"] == row.variant:
        return "1.00× (reference)"
    parts = [f"{k} ×{row.speedup[k]:.2f}" for k in ("pp", "tg") if k in row.speedup]
    return ", ".join(parts) + f" vs {row.speedup['reference']}"


def use_case(row: Row, recs: list[Recommendation]) -> str:
    faithful = [r.target.label for r in recs if r.variant == row.variant]
    fastest = [r.target.label for r in recs if r.fastest == row.variant]
    said = ([f"most faithful for {'; '.join(faithful)}"] if faithful else []) + (
        [f"fastest for {'; '.join(fastest)}"] if fastest else [])
    if said:
        return "; ".join(said)
    if cpu_only(row):
        return f"{engines(row)} on CPU or any GPU"
    return f"{engines(row)} on GPUs {min_gpu(row)}"


def row_notes(row: Row) -> str:
    """Missing metrics, and what each measured KV-cache type adds to the mean KLD."""
    said = [f"missing: {', '.join(row.missing_metrics)}"] if row.missing_metrics else []
    said += [f"KV cache {kind}: KLD {m['added_mean_kld']:+.4f}" for kind, m in (row.kv_cache or {}).items()]
    return "; ".join(said)


SUMMARY_HEAD = ["Variant", "Format", "Bits", "Quality vs baseline", "Speedup (same engine)", "Use case"]
DETAIL_HEAD = ["Variant", "Engines", "Format", "Bits/weight", "Size", "PPL", "PPL ratio", "Mean KLD", "P99 KLD",
               "Top-1", "PP tok/s", "TG tok/s", "Speed: where, how", "Gate", "Min GPU"]


def summary_cells(row: Row, recs: list[Recommendation]) -> list[str]:
    return [row.variant, fmt_name(row), _num(row.weight_bits, "g"), quality(row), speedup(row), use_case(row, recs)]


def detail_cells(row: Row) -> list[str]:
    m = row.metrics
    return [row.variant, engines(row), fmt_name(row), _num(row.weight_bits, "g"), size_gb(row),
            _num(m.get("ppl"), ".3f"), _num(m.get("ppl_ratio"), ".4f"), kld(m.get("mean_kld")),
            kld(m.get("p99_kld")), _num(None if (top1 := m.get("top1")) is None else top1 * 100, ".1f"),
            speed_cell(row, "pp"), speed_cell(row, "tg"), hardware(row), gate(row), min_gpu(row)]


# -- Markdown -----------------------------------------------------------------------------------


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in esc]


def markdown(rep: Report) -> str:
    lines = [f"# {rep.model}: quality × size × speed", "",
             f"{len(rep.rows)} published variant(s) in `{rep.storage}`; generated {rep.generated}. "
             "Quality is measured against the unquantized baseline on the recipe's eval text; speed is "
             "measured where the variant's engine ran on real hardware, else estimated (marked est.).", "", "## Summary", ""]
    lines += _md_table(SUMMARY_HEAD, [summary_cells(r, rep.recommendations) for r in rep.rows])
    lines += ["", "## Recommendations", ""]
    lines += [f"- **{r.target.label}:** most faithful: {r.reason} Fastest: {r.fastest_reason}"
              for r in rep.recommendations] or ["- no targets declared"]
    lines += ["", "## Plots", ""]
    lines += [f"![{caption}]({name})\n" for name, (caption, _png) in rep.plots.items()]
    lines += ["## Every variant", ""]
    lines += _md_table(DETAIL_HEAD + ["Notes"], [detail_cells(r) + [row_notes(r)] for r in rep.rows])
    if rep.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in rep.notes]
    return "\n".join(lines) + "\n"


# -- HTML ---------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#111827;background:#fff}
h1{font-size:22px} h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0;font-size:12.5px}
th,td{border:1px solid #d1d5db;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6} tr.missing td{background:#fef3c7} td.nm{color:#9ca3af;font-style:italic}
figure{margin:12px 0} figure img{max-width:100%;border:1px solid #e5e7eb}
figcaption{font-size:12px;color:#4b5563}
"""


def _html_table(head: list[str], rows: list[list[str]], ident: str, classes: list[str] | None = None) -> str:
    out = [f'<table id="{ident}"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td{" class=nm" if c.startswith(NOT_MEASURED) else ""}>{html.escape(c)}</td>' for c in r)
        out.append(f"<tr{cls}>{cells}</tr>")
    return "".join(out) + "</tbody></table>"


def html_page(rep: Report) -> str:
    recs = "".join(f"<li><b>{html.escape(r.target.label)}:</b> most faithful: {html.escape(r.reason)} "
                   f"Fastest: {html.escape(r.fastest_reason)}</li>" for r in rep.recommendations)
    figures = "".join(
        f'<figure><img id="plot-{name.rsplit(".", 1)[0]}" alt="{html.escape(caption)}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for name, (caption, png) in rep.plots.items())
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in rep.notes)
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(rep.model)}: quantized variants</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(rep.model)}: quality × size × speed</h1>"
        f"<p>{len(rep.rows)} published variant(s) in <code>{html.escape(rep.storage)}</code>; generated "
        f"{html.escape(rep.generated)}. Quality is measured against the unquantized baseline on the recipe's eval "
        "text; speed is measured where the variant's engine ran on real hardware, else estimated (marked est.).</p>"
        "<h2>Summary</h2>" + _html_table(SUMMARY_HEAD, [summary_cells(r, rep.recommendations) for r in rep.rows], "summary")
        + f"<h2>Recommendations</h2><ul id=recommendations>{recs or '<li>no targets declared</li>'}</ul>"
        + f"<h2>Plots</h2>{figures}"
        + "<h2>Every variant</h2>"
        + _html_table(DETAIL_HEAD + ["Notes"], [detail_cells(r) + [row_notes(r)] for r in rep.rows], "variants",
                      ["missing" if r.missing_metrics else "" for r in rep.rows])
        + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
        + "</body></html>\n"
    )
