"""One row per published variant of a model: the newest version's figures from its manifest.

Only what was measured goes in a row. A figure the manifest lacks stays ``None`` and is shown as
"not measured"; speed is measured only where a stage ran the variant's engine on real hardware
(today: llama-bench on the CPU for GGUF variants), and estimated (``pipeline.report.estimate``,
labelled as such) on each target GPU for the variants of GPU engines.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline import engines, hardware
from pipeline.errors import IntegrityError, StorageError
from pipeline.files import MANIFEST
from pipeline.hashing import digest_bytes
from pipeline.report.estimate import Estimate, estimate, unquantized
from pipeline.storage.base import Storage
from pipeline.storage.consume import latest_entries
from pipeline.storage.registry import read_index

METRICS = ("ppl", "ppl_ratio", "mean_kld", "p99_kld", "top1")


@dataclass
class Row:
    variant: str
    version: str
    engines: list[str]
    format: str | None
    scheme: str | None
    weight_bits: float | None
    size_bytes: int | None
    metrics: dict[str, float | None]
    gate_passed: bool | None
    min_compute_capability: float | None
    # {"pp_tps", "tg_tps", "pp_range", "tg_range", "pp_tokens", "tg_tokens", "hardware", "tool", "threads", "load"}
    speed: dict[str, Any] | None = None
    speedup: dict[str, float | str] | None = None  # vs the unquantized model in the same engine: {"pp", "tg", "reference"}
    # Per target GPU (GPU engines' variants): the estimated speed, and the same for the model in 16 bits.
    estimates: dict[str, Estimate] = field(default_factory=dict)
    reference_estimates: dict[str, Estimate] = field(default_factory=dict)
    kv_cache: dict[str, dict[str, Any]] | None = None  # GGUF: per KV-cache type, its metrics and added mean KLD
    location: str = ""
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def missing_metrics(self) -> list[str]:
        return [k for k in METRICS if self.metrics.get(k) is None]

    @property
    def unquantized(self) -> bool:
        return (self.weight_bits or 0) >= 16


def _speed(manifest: dict[str, Any]) -> dict[str, Any] | None:
    raw = manifest.get("speed")
    if not raw:
        return None
    pp = [(int(k[2:-4]), v) for k, v in raw.items() if re.fullmatch(r"pp\d+_tps", k)]
    tg = [(int(k[2:-4]), v) for k, v in raw.items() if re.fullmatch(r"tg\d+_tps", k)]
    if not pp and not tg:
        return None
    return {
        "pp_tokens": pp[0][0] if pp else None, "pp_tps": pp[0][1] if pp else None,
        "tg_tokens": tg[0][0] if tg else None, "tg_tps": tg[0][1] if tg else None,
        "pp_range": raw.get(f"pp{pp[0][0]}_tps_range") if pp else None,
        "tg_range": raw.get(f"tg{tg[0][0]}_tps_range") if tg else None,
        "hardware": raw.get("cpu_model") or raw.get("cpu") or "unknown CPU",
        "threads": raw.get("threads"), "tool": raw.get("tool"), "repetitions": raw.get("repetitions"),
        "load": raw.get("load"),
    }


def read_manifest(storage: Storage, entry: dict[str, Any]) -> dict[str, Any]:
    """The manifest of an index entry, checked against the digest the index recorded.

    Raises:
        IntegrityError: missing, not JSON, or not the manifest the index recorded (names it).
    """
    rel = f"{entry['model']}/{entry['variant']}/{entry['version']}/{MANIFEST}"
    where = storage.location(rel)
    fix = "run `modelbuild verify` on it; republish the variant or `modelbuild reindex` the store"
    try:
        raw = storage.read_bytes(rel)
    except FileNotFoundError:
        raise IntegrityError(f"manifest missing: {where}", fix=fix) from None
    if entry.get("manifest_sha256") and digest_bytes(raw) != entry["manifest_sha256"]:
        raise IntegrityError(f"corrupt manifest {where}: its sha256 differs from the registry's record", fix=fix)
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise IntegrityError(f"corrupt manifest {where}: not JSON ({e})", fix=fix) from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"corrupt manifest {where}: not a JSON object", fix=fix)
    return manifest


def collect(storage: Storage, model: str, gpus: tuple[str, ...] = ()) -> list[Row]:
    """Rows for every variant of ``model`` published in ``storage`` (newest version each), with
    speed estimates on ``gpus`` for the variants of GPU engines that were not measured.

    Raises:
        StorageError: nothing published for ``model``.
        IntegrityError: a corrupt or missing manifest (named).
    """
    entries = latest_entries(read_index(storage), model)
    if not entries:
        raise StorageError(f"no published variants of {model!r} in {storage.url}",
                           fix="run the model's recipe first (`modelbuild run RECIPE`), or check --storage and the model name")
    rows = []
    for e in entries:
        manifest = read_manifest(storage, e)
        fmt = manifest.get("format") or {}
        metrics = manifest.get("metrics") or {}
        rows.append(Row(
            variant=e["variant"], version=e["version"],
            # Engine ids, whichever spelling the manifest was published with.
            engines=[engines.canonical(name) or name for name in fmt.get("engines") or e.get("engines") or []],
            format=fmt.get("format"), scheme=fmt.get("scheme"), weight_bits=fmt.get("weight_bits"),
            size_bytes=manifest.get("size_bytes"),
            metrics={k: metrics.get(k) if isinstance(metrics.get(k), (int, float)) else None for k in METRICS},
            gate_passed=(manifest.get("gate") or {}).get("passed"),
            min_compute_capability=fmt.get("min_compute_capability"),
            speed=_speed(manifest),
            kv_cache=manifest.get("kv_cache"),
            location=storage.location(f"{e['model']}/{e['variant']}/{e['version']}"),
            manifest=manifest,
        ))
    _add_speedups(rows)
    for row in rows:
        if row.speed is None and row.engines and not set(row.engines) & set(engines.CPU_IDS):
            where = [g for g in gpus if _runs_on(row, g)]
            row.estimates = {g: estimate(row.manifest, g) for g in where}
            if row.manifest.get("architecture"):
                row.reference_estimates = {g: estimate(unquantized(row.manifest), g) for g in where}
    return rows


def _runs_on(row: Row, gpu: str) -> bool:
    """Whether one of the row's engines runs its format on ``gpu`` (no estimate elsewhere)."""
    cc = hardware.compute_capability(gpu)
    spans = [engines.gpu_range((row.manifest.get("format") or {}).get("gpus") or {}, e) for e in row.engines]
    return cc is not None and any((low is None or cc >= low) and (high is None or cc < high) for low, high in spans)


def _add_speedups(rows: list[Row]) -> None:
    """Speed relative to the unquantized model in the same engine, measured on the same hardware
    with the same threads (llama.cpp: the F16 GGUF, else BF16)."""
    for row in rows:
        if row.speed is None or not row.engines:
            continue
        refs = [r for r in rows if r.unquantized and r.speed is not None and r.engines == row.engines
                and (r.speed["hardware"], r.speed["threads"]) == (row.speed["hardware"], row.speed["threads"])]
        if not refs:
            continue
        ref = sorted(refs, key=lambda r: (r.scheme != "F16", r.variant))[0]
        ref_speed = ref.speed
        if ref_speed is None:  # never: refs were chosen among measured rows
            continue
        row.speedup = {"reference": ref.variant}
        for k in ("pp", "tg"):
            if row.speed.get(f"{k}_tps") and ref_speed.get(f"{k}_tps"):
                row.speedup[k] = row.speed[f"{k}_tps"] / ref_speed[f"{k}_tps"]
