"""Quantization backends: one module each, behind the small interface in ``base``.

``pipeline.catalogue.BACKENDS`` names them; a module is imported only when its backend is used
(or a recipe is validated: backend modules import no library at import time), so ``modelbuild
--help``/``validate``/``schema`` never import torch or a backend library.
"""

from __future__ import annotations

from pipeline.backends.base import Backend, Quantizer
from pipeline.catalogue import BACKENDS, backend_class


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered as ``name``.

    Raises:
        KeyError: unknown name (the recipe schema rejects those before this is reached).
    """
    return backend_class(name)()


def distributions() -> list[tuple[str, str]]:
    """Every catalogued backend's (import name, distribution name) pairs, each pair once, in
    catalogue order (what a worker must have installed to run any backend's stages)."""
    pairs: list[tuple[str, str]] = []
    for name in BACKENDS:
        for pair in backend_class(name).distributions:
            if pair not in pairs:
                pairs.append(pair)
    return pairs


__all__ = ["Backend", "Quantizer", "distributions", "get_backend"]
