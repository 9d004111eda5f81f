"""What every variant shares, and the recipe's union of the backends' variant models.

Each backend declares its own parameter model (a ``VariantBase`` with a ``backend`` literal) in its
module; the union of those, discriminated by ``backend``, is built from ``pipeline.catalogue`` the
first time a recipe is validated or its schema is written (importing the backend modules then,
which import no backend library). A typo inside one backend's options produces one error with that
backend's field path, not one error per union member.

Stdlib and pydantic only: no backend library is imported here.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic_core import core_schema

from pipeline.catalogue import BACKENDS, backend_class
from pipeline.recipe.gate import Gate


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_regex(regex: str, shown: str) -> None:
    """Raises: ValueError: ``regex`` does not compile (``shown`` names it in the message)."""
    try:
        re.compile(regex)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"invalid regular expression {shown!r}: {e}") from None


class CalibrationOverride(Strict):
    """Per-variant changes to the recipe's calibration sampling."""

    samples: int | None = Field(None, ge=1, le=65536)
    seq_len: int | None = Field(None, ge=8, le=131072)
    seed: int | None = None


class VariantBase(Strict):
    if TYPE_CHECKING:
        # Each backend's model declares it as the Literal of its own name (the discriminator).
        backend: str
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    # Per-variant gate overrides the recipe's eval.gate field by field.
    gate: Gate | None = None
    calibration: CalibrationOverride | None = None

    def needs_calibration(self) -> bool:
        """Whether the quantize stage consumes calibration data (and so depends on its digest)."""
        return False

    def backend_params(self) -> dict:
        """The parameters that shape the quantized bytes (the stage key's parameters)."""
        return self.model_dump(mode="json", exclude={"name", "gate", "calibration"})


def variant_classes() -> tuple[type[VariantBase], ...]:
    """Each catalogued backend's variant model, in catalogue order."""
    return _classes(tuple(BACKENDS.items()))


def variant_adapter() -> TypeAdapter:
    """Validates one variant against the union of the catalogued backends' variant models."""
    return _adapter(variant_classes())


@functools.cache
def _classes(entries: tuple[tuple[str, str], ...]) -> tuple[type[VariantBase], ...]:
    # Keyed on the catalogue's contents: a catalogue with one more line gets its own union.
    return tuple(backend_class(name).variant for name, _path in entries)


@functools.cache
def _adapter(classes: tuple[type[VariantBase], ...]) -> TypeAdapter:
    if len(classes) == 1:
        return TypeAdapter(classes[0])
    # Union of a tuple built at run time: no ``A | B`` spelling exists for that.
    return TypeAdapter(Annotated[Union[classes], Field(discriminator="backend")])  # noqa: UP007


if TYPE_CHECKING:
    Variant = VariantBase  # what the type checker sees: every variant model derives from it
else:
    class Variant:
        """The recipe's variant field type: the catalogue's union, looked up when a recipe is
        validated or its JSON schema written (not when this module is imported)."""

        @classmethod
        def __get_pydantic_core_schema__(cls, _source: Any, _handler: Any) -> core_schema.CoreSchema:
            def validate(value: Any, info: core_schema.ValidationInfo) -> VariantBase:
                # The union's own errors (with their field paths) come through as they are.
                return variant_adapter().validate_python(value, context=info.context)

            return core_schema.with_info_plain_validator_function(validate)

        @classmethod
        def __get_pydantic_json_schema__(cls, _schema: Any, handler: Any) -> dict[str, Any]:
            return handler(variant_adapter().core_schema)
