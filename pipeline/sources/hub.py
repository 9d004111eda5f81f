"""A Hugging Face Hub repository, through huggingface_hub.

The revision (branch or tag) is resolved to a commit sha first: the fetch key and the lock file
name the commit, so a moved branch is a different source. Only weights, configs, tokenizer and
chat-template files are downloaded; pickle weights only when the recipe opts in. With
``HF_HUB_OFFLINE=1`` everything is served from the local Hub cache (``HF_HUB_CACHE``).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import SourceError
from pipeline.sources import ResolvedSource
from pipeline.sources.checkpoint import allow_patterns, copy_files, inspect_checkpoint

_SHA = re.compile(r"^[0-9a-f]{40}$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> str | None:
    """The Hub cache folder as huggingface_hub resolves it (HF_HUB_CACHE, else HF_HOME/hub, else
    its default: None), read now: huggingface_hub freezes these variables when first imported."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


@contextlib.contextmanager
def hub_errors(where: str, repo: str, revision: str, *, offline_fix: str) -> Iterator[None]:
    """What huggingface_hub raises, as one SourceError line naming ``where`` (callers catch the
    cases only they can word, e.g. a missing file, inside this)."""
    import httpx
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError:
        raise SourceError("not in the local Hub cache and HF_HUB_OFFLINE is set", where=where,
                          fix=offline_fix) from None
    except RevisionNotFoundError:
        raise SourceError(f"revision {revision!r} does not exist (any more) in {repo}", where=where,
                          fix="pin a revision that exists (a branch, tag or commit of the repo)") from None
    except RepositoryNotFoundError:
        raise SourceError(f"repository {repo} does not exist or is not visible to this token", where=where,
                          fix="check the repo id and HF_TOKEN") from None
    except HfHubHTTPError as e:
        raise SourceError(f"the Hub refused: {e}", where=where, fix="check the repo id, revision and token") from None
    except (OSError, httpx.TransportError) as e:
        # huggingface_hub 1.x speaks httpx: a refused connection, DNS failure or timeout is an
        # httpx.TransportError, not an OSError.
        raise SourceError(f"cannot reach the Hub: {e.__class__.__name__}: {e}", where=where,
                          fix="check the network or use HF_HUB_OFFLINE=1") from None


def resolve(source) -> ResolvedSource:
    commit = source.revision if _SHA.match(source.revision) else _resolve_commit(source)
    patterns = allow_patterns(source.allow_pickle)
    return ResolvedSource(
        kind="hub",
        identity={"kind": "hub", "repo": source.repo, "commit": commit, "allow_patterns": patterns},
        provenance={"kind": "hub", "repo": source.repo, "revision": source.revision, "commit": commit},
    )


def _resolve_commit(source) -> str:
    from huggingface_hub import HfApi, snapshot_download

    where = f"source {source.repo}@{source.revision}"
    with hub_errors(where, source.repo, source.revision, offline_fix="download it once online, or unset HF_HUB_OFFLINE"):
        if _offline():
            # Offline, the cache's refs/<revision> names the commit; the snapshot folder is it.
            path = snapshot_download(
                source.repo, revision=source.revision, local_files_only=True, cache_dir=cache_dir(),
                allow_patterns=["config.json"],
            )
            return Path(path).name
        return HfApi().model_info(source.repo, revision=source.revision).sha


def materialize(source, resolved: ResolvedSource, out_dir: Path) -> dict:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    commit = resolved.identity["commit"]
    where = f"source {source.repo}@{commit[:12]}"
    try:
        snap = Path(
            snapshot_download(
                source.repo, revision=commit, allow_patterns=resolved.identity["allow_patterns"],
                local_files_only=_offline(), cache_dir=cache_dir(),
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
        source.repo, "config.json", revision=resolved.identity["commit"], cache_dir=cache_dir(),
        local_files_only=_offline(),
    )
    return Path(path).parent


def releases(recipe) -> dict[str, list[str]]:
    """What the recipe's watch rules see upstream now: the source repo's tags and the matching
    repositories of each watched author (one Hub API call each).

    Raises:
        SourceError: offline, unreachable, or the Hub refused.
    """
    from fnmatch import fnmatch

    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    rules = recipe.watch
    where = f"watch rules of {recipe.name}"
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        raise SourceError("HF_HUB_OFFLINE is set: the Hub cannot be asked for releases", where=where,
                          fix="run where the Hub is reachable")
    api = HfApi()
    out: dict[str, list[str]] = {"tags": [], "repos": []}
    try:
        if rules.tags:
            out["tags"] = sorted(t.name for t in api.list_repo_refs(recipe.source.repo).tags)
        for i, rule in enumerate(rules.new_repos):
            matched = [m.id for m in api.list_models(author=rule.author)
                       if fnmatch(m.id.split("/", 1)[-1], rule.pattern)]
            if not matched:
                # Most likely a typo in the author or the pattern: watching nothing is not "nothing new".
                raise SourceError(f"watch rule matches no repository: author {rule.author!r}, pattern {rule.pattern!r}",
                                  where=f"watch.new_repos.{i}", fix="check the author and the pattern on the Hub")
            out["repos"] += matched
    except (HfHubHTTPError, OSError, httpx.TransportError) as e:
        raise SourceError(f"cannot list releases on the Hub: {e.__class__.__name__}: {str(e).splitlines()[0]}",
                          where=where, fix="check the network, HF_ENDPOINT and the watch rules") from None
    out["repos"] = sorted(set(out["repos"]))
    return out
