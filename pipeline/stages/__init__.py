"""What each stage kind does. One module per kind, each with ``run(ctx, stage, inputs, out)``,
its ``Inputs`` (a TypedDict: the roles it reads, each an upstream ``StageInput``; optional roles
are those of a ``total=False`` class) and its ``Result`` (a TypedDict, JSON-able: it is stored
with the cache entry). The planner wires a stage's inputs by those roles (``Stage.roles``).

``VERSIONS`` is the code version of each kind's output; it enters every key of that kind, so
bump it when a change to a runner would change what it writes.
"""

from __future__ import annotations

import importlib

VERSIONS: dict[str, int] = {
    "fetch": 3,
    "baseline": 3,
    "quantize": 3,
    "evaluate": 2,
    "gate": 1,
    "publish": 2,
    "gguf_convert": 1,
    "gguf_fidelity": 1,
    "gguf_imatrix": 2,
    "gguf_quantize": 3,
    "gguf_speed": 2,
    "gguf_kv_cache": 1,
    "trtllm_engine": 1,
    "publish_engine": 1,
}


def runner(kind: str):
    """The module that runs stages of ``kind`` (imported on first use)."""
    return importlib.import_module(f"pipeline.stages.{kind}")
