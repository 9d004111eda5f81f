"""A recommendation per deployment target, computed with ``select``'s rule (the newest versions
that passed their gate, load in the engine, run on the GPU, fit the memory and quality bounds:
the lowest mean KLD, then the smallest) and explained in one sentence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import engines
from pipeline.figures import kld as fmt_kld
from pipeline.storage.consume import select


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


def default_targets(present: set[str], gpus: list[str]) -> list[Target]:
    """Without declared targets: each engine present (ids) where its catalogue record says the
    report recommends for it: on each recipe GPU (H100 when none), or on the CPU (llama.cpp).
    GPU engines come first, then CPU ones, each in the catalogue's order."""
    found = [e for e in engines.CATALOGUE if e.id in present]
    out = [Target(e.id, gpu) for e in found if e.recommended_on == "gpus" for gpu in (gpus or ["H100"])]
    return out + [Target(e.id, "cpu") for e in found if e.recommended_on == "cpu"]


def recommend(index: dict[str, Any], model: str, targets: list[Target]) -> list[Recommendation]:
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
        out.append(Recommendation(
            t, best["variant"],
            f"{best['variant']} ({quality}, {size:.3f} GB) has the lowest mean KLD of the {pool} variant(s) that "
            f"{conditions}."))
    return out
