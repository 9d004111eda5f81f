"""Two recommendations per deployment target, each explained in one sentence:

- the **most faithful** variant, by ``select``'s rule (the newest versions that passed their gate,
  load in the engine, run on the GPU, fit the memory and quality bounds: the lowest mean KLD, then
  the smallest);
- the **fastest** among the same variants whose mean KLD is within the report's quality floor
  (``report.fast_max_kld``): the least time, at batch 1, for a chat turn (``REQUEST_PROMPT``
  prompt tokens read, ``REQUEST_NEW`` written), from speeds measured where the engine ran on the
  target (llama.cpp on this CPU), else estimated for the target GPU (``report.estimate``, and said
  to be an estimate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import engines
from pipeline.figures import kld as fmt_kld
from pipeline.recipe.schema import FAST_MAX_KLD
from pipeline.report.data import Row
from pipeline.storage.consume import candidates, select


@dataclass(frozen=True)
class Target:
    engine: str
    gpu: str
    max_gb: float | None = None
    max_kld: float | None = None

    @property
    def label(self) -> str:
        where = "CPU" if self.gpu.lower() == "cpu" else self.gpu
        bounds = []
        if self.max_gb is not None:
            bounds.append(f"≤ {self.max_gb:g} GB")
        if self.max_kld is not None:
            bounds.append(f"mean KLD ≤ {self.max_kld:g}")
        name = engines.display(self.engine)
        return f"{name} on {where}" + (f" ({', '.join(bounds)})" if bounds else "")


@dataclass
class Recommendation:
    target: Target
    variant: str | None
    reason: str
    fastest: str | None = None
    fastest_reason: str = ""


def default_targets(present: set[str], gpus: list[str]) -> list[Target]:
    """Without declared targets: each engine present (ids) where its catalogue record says the
    report recommends for it: on each recipe GPU (H100 when none), or on the CPU (llama.cpp).
    GPU engines come first, then CPU ones, each in the catalogue's order."""
    found = [e for e in engines.CATALOGUE if e.id in present]
    out = [Target(e.id, gpu) for e in found if e.recommended_on == "gpus" for gpu in (gpus or ["H100"])]
    return out + [Target(e.id, "cpu") for e in found if e.recommended_on == "cpu"]


# The request the fastest pick is timed on: a prompt and a reply of a chat turn.
REQUEST_PROMPT = 1024
REQUEST_NEW = 128


def request_seconds(row: Row, gpu: str, *, decode_only: bool = False) -> tuple[float, str] | None:
    """Seconds the row's variant takes, at batch 1 on ``gpu`` (``cpu``: this machine's CPU), to
    read a ``REQUEST_PROMPT``-token prompt and write ``REQUEST_NEW`` tokens (only write them when
    ``decode_only``), from measured speeds, else estimated ones; and how that is known. None:
    the speeds it needs are neither measured nor estimated."""
    if gpu.lower() == "cpu":
        s = row.speed or {}
        prefill, decode, how = s.get("pp_tps"), s.get("tg_tps"), f"measured on {s.get('hardware')}"
    else:
        est = row.estimates.get(gpu)
        prefill, decode, how = (est.prefill_tps, est.decode_tps, f"estimated on {gpu}") if est else (None, None, "")
    if not decode or not (prefill or decode_only):
        return None
    seconds = REQUEST_NEW / decode + (REQUEST_PROMPT / prefill if prefill and not decode_only else 0.0)
    work = f"{REQUEST_NEW} new tokens" if decode_only else f"a {REQUEST_PROMPT}-token prompt and {REQUEST_NEW} new tokens"
    return seconds, f"{seconds * 1e3:,.1f} ms for {work}, {how}: generation {decode:,.0f} tok/s" + (
        "" if decode_only else f", prompt {prefill:,.0f} tok/s")


def recommend(index: dict[str, Any], model: str, targets: list[Target], rows: list[Row] | None = None,
              fast_max_kld: float = FAST_MAX_KLD) -> list[Recommendation]:
    by_version = {(r.variant, r.version): r for r in rows or []}
    out = []
    for t in targets:
        best, why = select(index, engine=t.engine, gpu=t.gpu, max_gb=t.max_gb, max_kld=t.max_kld, model=model)
        if best is None:
            out.append(Recommendation(t, None, "nothing fits: " + ", then ".join(why) + "."))
            continue
        pool = int(why[-1].split()[0])
        kld = best.get("metrics", {}).get("mean_kld")
        size = (best.get("size_bytes") or 0) / 1e9
        conditions = ", ".join(w.split(" ", 1)[1] for w in why[1:])
        quality = f"mean KLD {fmt_kld(kld)}" if isinstance(kld, (int, float)) else "no KLD measured"
        rec = Recommendation(
            t, best["variant"],
            f"{best['variant']} ({quality}, {size:.3f} GB) has the lowest mean KLD of the {pool} variant(s) that "
            f"{conditions}.")
        floor = fast_max_kld if t.max_kld is None else min(t.max_kld, fast_max_kld)
        good, _ = candidates(index, engine=t.engine, gpu=t.gpu, max_gb=t.max_gb, max_kld=floor, model=model)
        rows_of = [(e, row) for e in good if (row := by_version.get((e["variant"], e["version"]))) is not None]
        # Time the whole request where every candidate has both speeds, else their generation alone.
        decode_only = any(request_seconds(row, t.gpu) is None and request_seconds(row, t.gpu, decode_only=True)
                          for _e, row in rows_of)
        timed = [(took, e) for e, row in rows_of
                 if (took := request_seconds(row, t.gpu, decode_only=decode_only)) is not None]
        if not good:
            rec.fastest_reason = f"none of them has mean KLD ≤ {floor:g}."
        elif not timed:
            rec.fastest_reason = f"no speed measured or estimated on {t.gpu} for the {len(good)} with mean KLD ≤ {floor:g}."
        else:
            (_seconds, how), entry = min(timed, key=lambda pair: (pair[0][0], pair[1]["metrics"]["mean_kld"]))
            rec.fastest = entry["variant"]
            rec.fastest_reason = (f"{entry['variant']} (mean KLD {fmt_kld(entry['metrics']['mean_kld'])}; {how}) is the "
                                  f"fastest of the {len(timed)} with mean KLD ≤ {floor:g}.")
        out.append(rec)
    return out
