"""Storage URLs: which backend a root names, and name checks for what goes inside one.

- a path or ``file://PATH``: a local or NFS-mounted folder (:mod:`pipeline.storage.local`)
- ``s3://BUCKET[/PREFIX]``: S3 or an S3-compatible store (:mod:`pipeline.storage.s3`)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.errors import StorageError
from pipeline.storage.base import Storage

# A model, variant, version or channel name: one path segment, never ``.``/``..`` or hidden.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SCHEMES = ("file", "s3")


def default_root() -> str:
    """``./artifacts`` as an absolute path: the store used when neither ``--storage``,
    ``$MODELBUILD_STORAGE`` nor a recipe's ``publish.root`` names one."""
    return str((Path.cwd() / "artifacts").resolve())


def open_storage(url: str, *, s3: dict[str, Any] | None = None) -> Storage:
    """The backend for ``url``.

    Args:
        url: a folder path, ``file://PATH`` or ``s3://BUCKET[/PREFIX]``.
        s3: ``{endpoint_url, region}`` from the recipe's ``publish.s3`` (credentials never).

    Raises:
        StorageError: a scheme no backend serves.
    """
    url = str(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        from pipeline.storage.local import LocalStorage

        return LocalStorage(url)
    scheme = scheme.lower()
    if scheme == "file":
        from pipeline.storage.local import LocalStorage

        return LocalStorage(rest)
    if scheme == "s3":
        from pipeline.storage.s3 import S3Storage

        return S3Storage(url, **(s3 or {}))
    raise StorageError(f"unknown storage scheme {scheme!r} in {url!r}", where="publish.root",
                       fix=f"use a folder path or one of: {', '.join(s + '://' for s in _SCHEMES)}")


def check_name(value: str, what: str) -> str:
    """``value`` if it is a safe single path segment, else a StorageError (path traversal)."""
    if not NAME.match(value or "") or ".." in value:
        raise StorageError(f"invalid {what} name {value!r}", where=what,
                           fix="use letters, digits, '.', '_' and '-' only, starting with a letter or digit, no '..'")
    return value
