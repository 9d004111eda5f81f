"""The interface of a quantization backend: what every backend provides (``Backend``) and the
capability of writing a checkpoint in the generic quantize stage (``Quantizer``)."""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.errors import ToolError


@dataclass(frozen=True)
class FormatInfo:
    """What a variant's files are and who can load them (recorded in the manifest).

    Attributes:
        format: the checkpoint format, e.g. ``compressed-tensors``.
        scheme: the quantization scheme in the backend's own naming.
        weight_bits: bits per quantized weight (scales not counted).
        engines: serving engines that load this format.
        min_compute_capability: lowest NVIDIA compute capability the engines run it on.
        serve: per engine, the command that serves the published folder (``{path}`` is filled in).
        cpu_evaluation: how the CPU quality check computes what the engine computes.
        gpus: per engine, ``[lowest compute capability, upper bound (exclusive) or None]``;
            default: every engine from ``min_compute_capability`` up.
        compute: the precision of the GPU engines' matmuls on the quantized layers (``16-bit``
            for weight-only formats, whose kernels dequantize to the activations' 16 bits;
            ``fp8``, ``int8``, ``fp4``); None for formats no GPU engine serves. The report's
            prefill estimates read the GPU's peak for it.
        kv_cache: the KV cache's precision in the engine (``16-bit`` unless the format carries
            quantized KV-cache scales).
    """

    format: str
    scheme: str
    weight_bits: float
    engines: tuple[str, ...]
    min_compute_capability: float | None
    serve: dict[str, str] = field(default_factory=dict)
    cpu_evaluation: str = ""
    gpus: dict[str, list[float | None]] | None = None
    compute: str | None = None
    kv_cache: str = "16-bit"

    def __post_init__(self) -> None:
        # Per engine, the compute capabilities it runs the format on: [lowest, below this or None].
        if self.gpus is None:
            object.__setattr__(self, "gpus", {e: [self.min_compute_capability, None] for e in self.engines})


class Backend(ABC):
    """A quantization backend: declared data, the format of its output and how to evaluate it.

    Class attributes:
        name: the recipe's ``backend:`` value (its line in ``pipeline.catalogue.BACKENDS``).
        variant: the recipe's parameter model of its variants (a ``pipeline.recipe.variants.VariantBase``
            whose ``backend`` literal is ``name``); the recipe's variant union is built from these.
        distributions: (import name, distribution name) pairs it needs; their versions enter
            the quantize stage's key.
        extra: the ``pip install 'modelbuild[extra]'`` that provides them.
        chain: which stages the planner gives its variants (``pipeline.plan.build.CHAINS``):
            ``standard`` (quantize, evaluate, gate, publish), ``gguf`` or ``trtllm``.
    """

    name: ClassVar[str]
    variant: ClassVar[type]
    distributions: ClassVar[tuple[tuple[str, str], ...]]
    extra: ClassVar[str]
    chain: ClassVar[str] = "standard"

    @property
    def tools(self) -> tuple[str, ...]:
        return tuple(dist for _mod, dist in self.distributions)

    def check_environment(self) -> None:
        """Fail early, before any stage runs, when the backend's libraries are missing.

        Raises:
            ToolError: naming the missing distribution and the install command.
        """
        for module, dist in self.distributions:
            if importlib.util.find_spec(module) is None:
                raise ToolError(
                    f"backend {self.name!r} needs {dist}, which is not installed",
                    fix=f"pip install 'modelbuild[{self.extra}]'",
                )

    def check_variant(self, variant: Any, model_config: dict[str, Any]) -> None:
        """Plan-time checks of a variant against the model's config (shapes, architecture).

        Raises:
            RecipeError: the model cannot take this variant.
        """
        return None  # a backend without shape constraints accepts every variant

    @abstractmethod
    def describe(self, variant: Any) -> FormatInfo:
        """Format, engines and serving command of the variant's output (no heavy imports)."""

    @abstractmethod
    def load_for_eval(self, path: Path, device: str) -> Any:
        """Load a quantized checkpoint as a model computing what its engine computes.

        Weights must be the stored values dequantized exactly; activation quantization the engine
        performs is simulated (or the engine itself computes).
        """

    def runs_on(self, variant: Any, compute_capability: float, engine: str | None = None) -> bool:
        """Whether an engine (any of the variant's engines when None) runs the variant's format on
        a GPU of this compute capability. Default: from ``min_compute_capability``."""
        need = self.describe(variant).min_compute_capability
        return need is None or compute_capability >= need

    def gpu_requirement(self, variant: Any) -> str:
        """The GPUs the variant's format needs, in words (for error messages)."""
        need = self.describe(variant).min_compute_capability
        return "no particular GPU" if need is None else f"compute capability {need:g}+"

    def memory(self, variant: Any) -> dict[str, str | None]:
        """The memory model (``pipeline.memory.MODELS``) of the variant's ``quantize`` and
        ``evaluate`` stages. Default: both hold the whole model in fp32 (``load_for_eval``)."""
        return {"quantize": "whole-fp32", "evaluate": "whole-fp32"}

    def scores(self, path: Path, windows, device: str, scratch: Path) -> Iterator:
        """Per window of ``windows``, ``(logprobs [S-1, vocab], next ids [S-1])`` of the variant
        at ``path`` as its engine computes them. Default: the ``load_for_eval`` model, layer by
        layer (``pipeline.quality.streamed``); a backend that can read its format a layer at a
        time overrides this to keep memory at one layer.

        Args:
            scratch: an empty folder for offloaded weights and spilled hidden states.
        """
        from pipeline.quality.streamed import streamed_logprobs

        yield from streamed_logprobs(self.load_for_eval(path, device), windows, device, scratch=scratch)


class Quantizer(Backend):
    """A backend whose checkpoint the generic quantize stage writes (the standard chain: quantize,
    evaluate, gate, publish). Backends whose variants are built by stages of their own (llama.cpp's
    conversion and ``llama-quantize``) are plain ``Backend``s."""

    @abstractmethod
    def quantize(self, variant: Any, source: Path, out: Path, *, calibration: Any, device: str) -> dict[str, Any]:
        """Write the quantized checkpoint of ``source`` into ``out``; return facts for the manifest."""
