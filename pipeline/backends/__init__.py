"""Quantization backends: one module each, behind the small interface in ``base``.

``CATALOGUE`` maps the recipe's ``backend:`` names to import paths; modules are imported only
when a backend is used, so ``modelbuild --help``/``validate``/``schema`` never import torch or a
backend library.
"""

from __future__ import annotations

import importlib

from pipeline.backends.base import Backend

CATALOGUE: dict[str, str] = {
    "llmcompressor": "pipeline.backends.llmcompressor:LLMCompressorBackend",
    "llamacpp": "pipeline.backends.llamacpp:LlamaCppBackend",
    "modelopt": "pipeline.backends.modelopt:ModelOptBackend",
}


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered as ``name``.

    Raises:
        KeyError: unknown name (the recipe schema rejects those before this is reached).
    """
    module_name, _, attr = CATALOGUE[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)()


__all__ = ["CATALOGUE", "Backend", "get_backend"]
