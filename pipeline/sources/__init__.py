"""Model sources: where the unquantized weights come from, one module per kind.

Each kind module has ``resolve(source) -> ResolvedSource`` (cheap: pins the exact content, e.g. a
Hub commit or file digests, so the fetch stage's key is known before anything is downloaded) and
``materialize(source, resolved, out_dir)`` (writes a safetensors checkpoint folder).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_KINDS = {"hub": "pipeline.sources.hub", "local": "pipeline.sources.local", "gguf": "pipeline.sources.gguf"}


@dataclass(frozen=True)
class ResolvedSource:
    """A source pinned to exact content.

    Attributes:
        kind: hub, local or gguf.
        identity: what determines the fetched bytes; enters the fetch stage key.
        provenance: what manifests and lock files record (repo, commit, path, file digests).
        tools: distributions whose versions shape the fetched checkpoint.
    """

    kind: str
    identity: dict[str, Any]
    provenance: dict[str, Any]
    tools: tuple[str, ...] = field(default=())


def _module(kind: str):
    return importlib.import_module(_KINDS[kind])


def resolve(source) -> ResolvedSource:
    return _module(source.kind).resolve(source)


def materialize(source, resolved: ResolvedSource, out_dir: Path) -> dict[str, Any]:
    return _module(source.kind).materialize(source, resolved, out_dir)
