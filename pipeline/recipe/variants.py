"""Variant models: one class per backend, joined in a union discriminated by ``backend``.

A typo inside one backend's options produces one error with that backend's field path, not one
error per union member. Adding a backend adds one class here and one line in
``pipeline.backends.CATALOGUE``; no other backend is touched.

Stdlib and pydantic only: no backend library is imported here.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from pipeline.recipe.gate import Gate


class _VariantBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    # Per-variant gate overrides the recipe's eval.gate field by field.
    gate: Gate | None = None

    def needs_calibration(self) -> bool:
        """Whether the quantize stage consumes calibration data (and so depends on its digest)."""
        return False

    def backend_params(self) -> dict:
        """The parameters that shape the quantized bytes (the stage key's parameters)."""
        return self.model_dump(mode="json", exclude={"name", "gate"})


# Schemes the pinned llm-compressor runs without calibration data (weights only, or dynamic
# activation scales computed at inference time).
LLMCOMPRESSOR_DATA_FREE = ("FP8_DYNAMIC",)
LLMCOMPRESSOR_SCHEMES = LLMCOMPRESSOR_DATA_FREE


class LLMCompressorVariant(_VariantBase):
    """A compressed-tensors checkpoint made by llm-compressor, served by vLLM."""

    backend: Literal["llmcompressor"]
    scheme: Literal[LLMCOMPRESSOR_SCHEMES] = Field(  # type: ignore[valid-type]
        description="llm-compressor preset scheme name"
    )
    ignore: tuple[str, ...] = Field(("lm_head",), description="modules left unquantized")
    targets: tuple[str, ...] = Field(("Linear",), description="module types to quantize")

    def needs_calibration(self) -> bool:
        return self.scheme not in LLMCOMPRESSOR_DATA_FREE


Variant = Annotated[Union[LLMCompressorVariant], Field(discriminator="backend")]
