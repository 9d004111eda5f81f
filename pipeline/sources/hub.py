"""A Hugging Face Hub repository, through huggingface_hub.

The revision (branch or tag) is resolved to a commit sha first: the fetch key and the lock file
name the commit, so a moved branch is a different source. Only weights, configs, tokenizer and
chat-template files are downloaded; pickle weights only when the recipe opts in. With
``HF_HUB_OFFLINE=1`` everything is served from the local Hub cache (``HF_HUB_CACHE``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import SourceError
from pipeline.sources import ResolvedSource
from pipeline.sources.checkpoint import allow_patterns, copy_files, inspect_checkpoint

_SHA = re.compile(r"^[0-9a-f]{40}$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir() -> str | None:
    # Read at call time: huggingface_hub freezes its constants at import.
    return os.environ.get("HF_HUB_CACHE")


def resolve(source) -> ResolvedSource:
    commit = source.revision if _SHA.match(source.revision) else _resolve_commit(source)
    patterns = allow_patterns(source.allow_pickle)
    return ResolvedSource(
        kind="hub",
        identity={"kind": "hub", "repo": source.repo, "commit": commit, "allow_patterns": patterns},
        provenance={"kind": "hub", "repo": source.repo, "revision": source.revision, "commit": commit},
    )


def _resolve_commit(source) -> str:
    import httpx
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    where = f"source {source.repo}@{source.revision}"
    try:
        if _offline():
            # Offline, the cache's refs/<revision> names the commit; the snapshot folder is it.
            path = snapshot_download(
                source.repo, revision=source.revision, local_files_only=True, cache_dir=_cache_dir(),
                allow_patterns=["config.json"],
            )
            return Path(path).name
        return HfApi().model_info(source.repo, revision=source.revision).sha
    except LocalEntryNotFoundError:
        raise SourceError(
            "not in the local Hub cache and HF_HUB_OFFLINE is set", where=where,
            fix="download it once online, or unset HF_HUB_OFFLINE",
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"revision {source.revision!r} does not exist (any more) in {source.repo}", where=where,
                          fix="pin a revision that exists (a branch, tag or commit of the repo)") from None
    except RepositoryNotFoundError:
        raise SourceError(f"repository {source.repo} does not exist or is not visible to this token", where=where,
                          fix="check the repo id and HF_TOKEN") from None
    except HfHubHTTPError as e:
        raise SourceError(f"the Hub refused: {e}", where=where, fix="check the repo id, revision and token") from None
    except (OSError, httpx.TransportError) as e:
        # huggingface_hub 1.x speaks httpx: a refused connection, DNS failure or timeout is an
        # httpx.TransportError, not an OSError.
        raise SourceError(f"cannot reach the Hub: {e.__class__.__name__}: {e}", where=where,
                          fix="check the network or use HF_HUB_OFFLINE=1") from None


def materialize(source, resolved: ResolvedSource, out_dir: Path) -> dict:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    commit = resolved.identity["commit"]
    where = f"source {source.repo}@{commit[:12]}"
    try:
        snap = Path(
            snapshot_download(
                source.repo, revision=commit, allow_patterns=resolved.identity["allow_patterns"],
                local_files_only=_offline(), cache_dir=_cache_dir(),
            )
        )
    except LocalEntryNotFoundError:
        raise SourceError("files missing from the local Hub cache", where=where, fix="download it once online") from None
    files = inspect_checkpoint(
        snap, allow_pickle=source.allow_pickle, trust_remote_code=source.trust_remote_code, where=where
    )
    # Hub cache blobs are immutable, so hard links are safe and save a copy of the weights.
    copy_files(snap, files, out_dir, link=True)
    return {}


def config_path(source, resolved: ResolvedSource) -> Path:
    """The folder holding the pinned commit's config.json (downloads only that file)."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(
        source.repo, "config.json", revision=resolved.identity["commit"], cache_dir=_cache_dir(),
        local_files_only=_offline(),
    )
    return Path(path).parent
