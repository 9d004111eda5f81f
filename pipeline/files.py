"""File names every layer agrees on, and the one way modelbuild writes a small file whole."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# Beside every published variant: what its files are and why they can be trusted.
MANIFEST = "manifest.json"


def atomic_write(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Replace ``path`` so that a reader sees the old content or the new, never a torn file.

    The bytes go to a temp file in the same folder (a rename is atomic only within one file
    system), are flushed to disk when ``durable``, then renamed over ``path``; the temp file is
    removed whatever fails.

    Raises:
        OSError: the folder cannot be written.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
