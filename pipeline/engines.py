"""The serving engines modelbuild publishes for, one record each: the one place their ids, names,
images, ports and rules live.

An engine's id is the spelling recipes, the CLI and everything written from now on use
(``vllm``, ``trtllm``, ``trtllm-engine``, ``llamacpp``); manifests published before that spelled
llama.cpp ``llama.cpp``, and published manifests are never rewritten, so every reader of stored
data maps a name through :func:`canonical`, which knows that alias, and nothing else does.

The catalogue holds data only. A record names its serving-profile builder (``profiles``) rather
than holding the function: the builders live in ``pipeline.publishing.serving`` beside the
options files they describe, and this module stays at the bottom of the import graph (the
recipe schema, storage and the report read it without importing publishing code). ``serving``
keeps one builder per name and a test checks every name here has one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import InputError


@dataclass(frozen=True)
class Engine:
    """One serving engine.

    Args:
        id: the engine's id in recipes, the CLI, manifests and serving profiles.
        name: its name in text people read ("llama.cpp").
        long_name: the name in a model card, which says which TensorRT-LLM backend is meant.
        tags: the Hugging Face model-card tags of a variant it loads.
        image: the official container image a deployment replica runs.
        port: the port its server listens on unless the profile's command says otherwise.
        cpu: whether it runs on a CPU (the others need an NVIDIA GPU).
        profiles: the serving-profile builder in ``pipeline.publishing.serving`` that makes its
            profiles at plan time (None: none; TensorRT-LLM engines are built per GPU and
            published with their own serve command).
        image_runs_server: the image's entrypoint is the server itself, so a replica's command
            is the server's arguments only.
        ipc_host: its tensor-parallel workers share memory with each other (``ipc: host``).
        recommended_on: where the report recommends a variant for it when the recipe names no
            targets: ``cpu``, each of the recipe's ``gpus``, or nowhere (None).
        starter: the variants ``modelbuild init`` writes for it, in words (None: init offers it
            none).
        thread_flags: the server's flags that set how many CPU threads it computes on (a CPU
            engine's server otherwise takes every core of the host, so replicas on one host
            oversubscribe it).
    """

    id: str
    name: str
    long_name: str
    tags: tuple[str, ...]
    image: str
    port: int
    cpu: bool
    profiles: str | None
    image_runs_server: bool = False
    ipc_host: bool = False
    recommended_on: Literal["cpu", "gpus"] | None = None
    starter: str | None = None
    thread_flags: tuple[str, ...] = ()


# Official images; pin a tag in production (the profiles' options follow these engines' CLIs).
_TRTLLM_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:latest"

CATALOGUE: tuple[Engine, ...] = (
    Engine("vllm", "vLLM", "vLLM", ("vllm",), "vllm/vllm-openai:latest", 8000, cpu=False, profiles="vllm",
           ipc_host=True, recommended_on="gpus", starter="compressed-tensors checkpoints made by llm-compressor"),
    Engine("trtllm", "TensorRT-LLM", "TensorRT-LLM (PyTorch backend)", ("tensorrt-llm",), _TRTLLM_IMAGE, 8000,
           cpu=False, profiles="trtllm", recommended_on="gpus",
           starter="Hugging Face checkpoints quantized by NVIDIA ModelOpt (served by trtllm-serve)"),
    Engine("trtllm-engine", "TensorRT-LLM engines", "TensorRT-LLM engines", ("tensorrt-llm",), _TRTLLM_IMAGE, 8000,
           cpu=False, profiles=None),
    Engine("llamacpp", "llama.cpp", "llama.cpp", ("llama.cpp",), "ghcr.io/ggml-org/llama.cpp:server", 8080,
           cpu=True, profiles="llama-server", image_runs_server=True, recommended_on="cpu",
           starter="GGUF files made by llama.cpp's converter and llama-quantize",
           thread_flags=("--threads", "--threads-batch")),
)
IDS: tuple[str, ...] = tuple(e.id for e in CATALOGUE)
CPU_IDS: tuple[str, ...] = tuple(e.id for e in CATALOGUE if e.cpu)
# Spellings found in manifests published before the one spelling (readers only; never written).
LEGACY = {"llama.cpp": "llamacpp"}
_BY_ID = {e.id: e for e in CATALOGUE}


def canonical(name: str) -> str | None:
    """The engine id for ``name`` as a recipe, the CLI or a stored manifest spells it (any case,
    the legacy ``llama.cpp`` included); None for an unknown engine."""
    key = str(name).strip().lower()
    key = LEGACY.get(key, key)
    return key if key in _BY_ID else None


def find(name: str) -> Engine | None:
    """The record of ``name`` (spelled as :func:`canonical` accepts), or None."""
    key = canonical(name)
    return None if key is None else _BY_ID[key]


def get(name: str) -> Engine:
    """The record of ``name`` (spelled as :func:`canonical` accepts).

    Raises:
        InputError: an engine the catalogue does not know.
    """
    engine = find(name)
    if engine is None:
        raise InputError(f"unknown engine {name!r}", where="engine", fix=f"use one of: {', '.join(IDS)}")
    return engine


def display(name: str) -> str:
    """``name`` as people read it ("llama.cpp"); an unknown name as it is."""
    engine = find(name)
    return name if engine is None else engine.name


def either(ids: Iterable[str]) -> str:
    """Ids as a help text lists them: ``vllm, trtllm or llamacpp``."""
    ids = list(ids)
    return ids[0] if len(ids) == 1 else f"{', '.join(ids[:-1])} or {ids[-1]}"


def loads(listed: Iterable[str], engine: str) -> bool:
    """The load check: whether a manifest's or index entry's ``engines`` (either spelling) says
    ``engine`` (an id) loads the variant."""
    return any(canonical(e) == engine for e in listed)


def gpu_range(gpus: dict[str, Any], engine: str) -> list[float | None]:
    """``[low, high)`` compute capabilities ``engine`` (an id) runs the variant on, from a
    manifest's or index entry's ``gpus`` (keys in either spelling); ``[None, None]`` if absent."""
    for key, span in (gpus or {}).items():
        if canonical(key) == engine and span:
            return list(span)[:2]
    return [None, None]
