"""Stages: frozen descriptions of one unit of work, keyed by everything that shapes its output."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.hashing import digest_json


@dataclass(frozen=True)
class Hints:
    """What an executor needs to know to place a stage; a stage never imports an executor.

    Attributes:
        uses_gpu: runs faster on a GPU when one is present (falls back to CPU).
        needs_gpu: cannot run without one (e.g. an engine build).
        memory_gb: rough peak host memory, when known.
        memory_model: how the stage holds the model it reads (``pipeline.memory.MODELS``): its
            host-memory need is computed from that checkpoint before it is built.
        requires: what the machine must have, checked before the stage runs
            (``pipeline.hardware``): ``gpu:sm90`` (an NVIDIA GPU of that architecture),
            ``tensorrt_llm`` (a Python that imports TensorRT-LLM).
    """

    uses_gpu: bool = False
    needs_gpu: bool = False
    memory_gb: float | None = None
    memory_model: str | None = None
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One node of the build DAG.

    Attributes:
        id: unique and readable, e.g. ``quantize/fp8-dynamic``.
        kind: which runner executes it (``pipeline.stages.runner``).
        params: JSON-able parameters that shape the output.
        inputs: ids of the stages whose outputs it reads (their keys enter its key, in this order).
        after: ids of stages whose verdict it reads but whose output does not shape its own (an
            engine build waits for its checkpoint's gate; a changed gate threshold must not
            rebuild the engine): passed in like inputs, left out of the key.
        roles: the role each of ``inputs`` and ``after`` plays (role -> stage id): the runner
            gets its inputs under these names (its module's ``Inputs``); left out of the key.
        variant: the recipe variant the stage belongs to (None for shared stages); left out of
            the key (the variant's settings that shape the output are in ``params``).
        tools: distributions whose installed versions shape the output.
        version: the runner's code version (bumped when its output would change).
        cached: whether the output is a cache entry (gate and publish are not: they are cheap, or
            write outside the cache).
        hints: placement hints for executors.
        key: sha256 over all of the above and the inputs' keys; set by the planner.
    """

    id: str
    kind: str
    params: dict[str, Any]
    inputs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    roles: Mapping[str, str] = field(default_factory=dict)
    variant: str | None = None
    tools: tuple[str, ...] = ()
    version: int = 1
    cached: bool = True
    hints: Hints = field(default_factory=Hints)
    key: str = ""

    @classmethod
    def wired(cls, *, inputs: Mapping[str, str], after: Mapping[str, str] | None = None, **fields: Any) -> Stage:
        """A stage whose inputs (and ``after``) are given by role: role -> stage id, in key order."""
        after = after or {}
        return cls(inputs=tuple(inputs.values()), after=tuple(after.values()), roles={**inputs, **after}, **fields)

    def compute_key(self, input_keys: dict[str, str], tool_versions: dict[str, str]) -> str:
        return digest_json(
            {
                "kind": self.kind,
                "version": self.version,
                "params": self.params,
                "tools": {t: tool_versions[t] for t in sorted(self.tools)},
                "inputs": {i: input_keys[i] for i in self.inputs},
            }
        )
