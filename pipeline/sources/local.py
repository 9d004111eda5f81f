"""A checkpoint folder on disk. Its files are copied into the cache: the folder may change later."""

from __future__ import annotations

from pathlib import Path

from pipeline.hashing import sha256_file
from pipeline.sources import ResolvedSource
from pipeline.sources.checkpoint import copy_files, inspect_checkpoint


def resolve(source) -> ResolvedSource:
    root = Path(source.path)
    files = inspect_checkpoint(
        root, allow_pickle=source.allow_pickle, trust_remote_code=source.trust_remote_code, where="source.path"
    )
    digests = {f.as_posix(): sha256_file(root / f) for f in files}
    return ResolvedSource(
        kind="local",
        identity={"kind": "local", "files": digests},
        provenance={"kind": "local", "path": str(root), "files": digests},
    )


def materialize(source, resolved: ResolvedSource, out_dir: Path) -> dict:
    copy_files(Path(source.path), [Path(p) for p in resolved.identity["files"]], out_dir, link=False)
    return {}
