"""The catalogue of quantization backends: each recipe ``backend:`` name and the class that
implements it, as an import path (``module:Class``).

Pure data at the bottom of the layers: ``pipeline.backends`` instantiates backends from it and
``pipeline.recipe`` builds the variant union from the parameter models the backend classes
declare. A backend's module is imported only when it is first needed, so adding a backend is one
module and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKENDS: dict[str, str] = {
    "llmcompressor": "pipeline.backends.llmcompressor:LLMCompressorBackend",
    "llamacpp": "pipeline.backends.llamacpp:LlamaCppBackend",
    "modelopt": "pipeline.backends.modelopt:ModelOptBackend",
}


def backend_class(name: str) -> Any:
    """The class registered as ``name`` (its module imported now).

    Raises:
        KeyError: unknown name (the recipe schema rejects those before this is reached).
    """
    module_name, _, attr = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), attr)
