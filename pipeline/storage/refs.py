"""References to published variants: ``MODEL``, ``MODEL/VARIANT``, ``MODEL/VARIANT@VERSION`` or
``MODEL/VARIANT@CHANNEL`` (a channel name such as ``latest`` or ``stable``)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import StorageError
from pipeline.storage.location import check_name


@dataclass(frozen=True)
class Ref:
    model: str
    variant: str | None = None
    at: str | None = None  # a version or a channel

    def variant_name(self) -> str:
        """The variant, for a reference that must name one.

        Raises:
            StorageError: the reference names only a model.
        """
        if self.variant is None:
            raise StorageError(f"{self} names a model, not a variant", fix="write MODEL/VARIANT[@VERSION]")
        return self.variant

    def __str__(self) -> str:
        text = self.model + (f"/{self.variant}" if self.variant else "")
        return text + (f"@{self.at}" if self.at else "")


def parse_ref(text: str) -> Ref:
    """Parse a reference; every part is checked as one safe path segment.

    Raises:
        StorageError: a malformed reference or a name that could escape the store (``../``).
    """
    path, _, at = text.partition("@")
    model, _, variant = path.partition("/")
    check_name(model, "model")
    if variant:
        check_name(variant, "variant")
    if at:
        check_name(at, "version or channel")
    return Ref(model, variant or None, at or None)
