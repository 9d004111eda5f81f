"""The registry: ``index.json`` at the storage root, one entry per published version, and the
channel pointers ``<model>/<variant>/channels/<name>.json``.

Both are read-modify-write objects shared by every publisher, so both are updated through the
store's compare-and-swap (:meth:`Storage.write_if`): read with a token, change, write only if
nobody wrote in between, else read again and redo the change. No entry is lost however many
publishers race; each retry re-applies an idempotent change (upsert by model/variant/version).

The index is a cache of the manifests (what ``list``/``select`` need without reading every
manifest); each entry carries its manifest's sha256, so a reader can tell when they disagree.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from typing import Any

from pipeline.errors import IntegrityError, StorageError
from pipeline.files import MANIFEST
from pipeline.hashing import digest_bytes
from pipeline.storage.base import Storage
from pipeline.storage.manifest import parse_manifest
from pipeline.storage.refs import Ref

INDEX = "index.json"
INDEX_FORMAT = 1
CLAIMS = ".claims"  # per variant: build key -> the version name its first publisher chose
_VERSION = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{12}$")
_ATTEMPTS = 200  # 8 racing publishers settle in a handful; this bounds a pathological store


def update(storage: Storage, rel: str, change: Callable[[Any], Any], empty: Callable[[], Any], *,
           repair: bool = False) -> Any:
    """Apply ``change`` to the JSON object at ``rel`` by compare-and-swap; returns the new value.

    A malformed object is an IntegrityError, never overwritten, unless ``repair`` (``reindex``
    rebuilding the index from the manifests, which are the truth).

    Raises:
        StorageError: the object kept changing under us for every attempt.
    """
    for attempt in range(_ATTEMPTS):
        data, token = storage.read_versioned(rel)
        try:
            current = json.loads(data) if data is not None else empty()
        except ValueError:
            current = None
        if not repair and (not isinstance(current, dict) or (rel == INDEX and _index_problem(current))):
            # Never overwrite what cannot be read: its content might be the only record of it.
            raise IntegrityError(f"{storage.location(rel)} is malformed (not the JSON object modelbuild writes)",
                                 fix="restore it from a backup" + (" or rebuild it with `modelbuild reindex`"
                                                                    if rel == INDEX else ", or delete it by hand"))
        new = change(current)
        if data is not None and new == current:
            return new  # nothing to change (a rerun re-registering what is there): no write
        if storage.write_if(rel, _dump(new), token):
            return new
        time.sleep(min(0.5, 0.005 * 2 ** min(attempt, 7)) * random.random())  # jittered backoff
    raise StorageError(f"{storage.location(rel)} changed under every one of {_ATTEMPTS} attempts to update it",
                       fix="retry when fewer publishers are writing")


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


# -- index --------------------------------------------------------------------------------------


def _empty_index() -> dict[str, Any]:
    return {"format": INDEX_FORMAT, "entries": []}


def entry_from_manifest(manifest: dict[str, Any], manifest_bytes: bytes) -> dict[str, Any]:
    """What the index keeps of one version."""
    fmt = manifest.get("format", {})
    metrics = manifest.get("metrics", {})
    return {
        "model": manifest["model"],
        "variant": manifest["variant"],
        "version": manifest["version"],
        "build_key": manifest.get("build_key"),
        "format": fmt.get("format"),
        "scheme": fmt.get("scheme"),
        "weight_bits": fmt.get("weight_bits"),
        "engines": list(fmt.get("engines", [])),
        "gpus": fmt.get("gpus") or {e: [fmt.get("min_compute_capability"), None] for e in fmt.get("engines", [])},
        "min_compute_capability": fmt.get("min_compute_capability"),
        "size_bytes": manifest.get("size_bytes"),
        "metrics": {k: metrics.get(k) for k in ("ppl", "ppl_ratio", "mean_kld", "p99_kld", "top1")
                    if k in metrics},
        "gate": {"passed": manifest.get("gate", {}).get("passed")},
        "source": {k: manifest.get("source", {}).get(k) for k in ("kind", "repo", "revision", "commit", "package", "file", "sha256")
                   if manifest.get("source", {}).get(k) is not None},
        "created": manifest.get("created"),
        "manifest_sha256": digest_bytes(manifest_bytes),
    }


def read_index(storage: Storage) -> dict[str, Any]:
    try:
        data = storage.read_bytes(INDEX)
    except FileNotFoundError:
        return _empty_index()
    try:
        index = json.loads(data)
    except ValueError:
        index = None
    problem = _index_problem(index)
    if problem:
        raise IntegrityError(f"{storage.location(INDEX)} is malformed: {problem}",
                             fix="rebuild it with `modelbuild reindex`")
    return index


def _index_problem(index: Any) -> str | None:
    """What makes ``index`` unusable, or None. Readers rely on these keys; anything else in an
    entry is optional and read with defaults."""
    if not isinstance(index, dict):
        return "not a JSON object"
    entries = index.get("entries")
    if not isinstance(entries, list):
        return "no list of entries"
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            return f"entry {i} is not an object"
        for key in ("model", "variant", "version"):
            if not isinstance(e.get(key), str):
                return f"entry {i} has no {key}"
        for key, kind in (("engines", list), ("metrics", dict), ("gate", dict), ("gpus", dict)):
            if key in e and not isinstance(e[key], kind):
                return f"entry {i}: {key} is not a {kind.__name__}"
    return None


def is_version_name(name: str) -> bool:
    """True for a version name modelbuild writes (UTC time, build key prefix)."""
    return bool(_VERSION.match(name))


def add_entry(storage: Storage, entry: dict[str, Any]) -> None:
    ident = (entry["model"], entry["variant"], entry["version"])

    def change(index: dict[str, Any]) -> dict[str, Any]:
        kept = [e for e in index.get("entries", []) if (e["model"], e["variant"], e["version"]) != ident]
        return {**index, "entries": sorted([*kept, entry], key=lambda e: (e["model"], e["variant"], e["version"]))}

    update(storage, INDEX, change, _empty_index)


def remove_entries(storage: Storage, idents: set[tuple[str, str, str]]) -> None:
    def change(index: dict[str, Any]) -> dict[str, Any]:
        return {**index, "entries": [e for e in index.get("entries", [])
                                     if (e["model"], e["variant"], e["version"]) not in idents]}

    update(storage, INDEX, change, _empty_index)


def reindex(storage: Storage, check: Callable[[str, str, str], list[str]]) -> tuple[dict[str, Any], list[str]]:
    """Rebuild the index from the manifests in the store (the manifests are the truth), indexing
    only versions whose manifest is well-formed and whose files match it.

    Args:
        check: ``(model, variant, version) -> problems`` (the same checker ``verify`` uses).

    Returns:
        ``(index, lines)``: one line per version left out, saying why.
    """
    entries, left_out = [], []
    for model in storage.list_dir(""):
        if model.startswith(".") or model == INDEX or not storage.list_dir(model):
            continue
        for variant in storage.list_dir(model):
            for version in versions(storage, model, variant):
                ref = f"{model}/{variant}@{version}"
                try:
                    raw = storage.read_bytes(f"{model}/{variant}/{version}/{MANIFEST}")
                    manifest = parse_manifest(raw, ref)
                    problems = check(model, variant, version)
                except IntegrityError as e:
                    problems = [e.message]
                if not problems and (manifest.get("model"), manifest.get("variant"), manifest.get("version")) != (
                        model, variant, version):
                    problems = ["its manifest names another model, variant or version"]
                if problems:
                    left_out.append(f"{ref}: {'; '.join(problems[:3])}")
                    continue
                entries.append(entry_from_manifest(manifest, raw))
    index = {"format": INDEX_FORMAT, "entries": entries}
    update(storage, INDEX, lambda _old: index, _empty_index, repair=True)
    return index, left_out


def versions(storage: Storage, model: str, variant: str) -> list[str]:
    """Complete versions of a variant (their manifest exists), oldest first."""
    base = f"{model}/{variant}"
    return [v for v in storage.list_dir(base)
            if not v.startswith(".") and v != "channels" and storage.exists(f"{base}/{v}/{MANIFEST}")]


# -- channels -----------------------------------------------------------------------------------


def channel_rel(model: str, variant: str, channel: str) -> str:
    return f"{model}/{variant}/channels/{channel}.json"


def read_channel(storage: Storage, model: str, variant: str, channel: str) -> dict[str, Any] | None:
    """A channel's pointer ``{version, history, ...}``; None when there is no such channel.

    Raises:
        IntegrityError: the channel file exists but is not a pointer modelbuild wrote. Callers
            fail closed on it: a version an unreadable channel might name is never deleted.
    """
    rel = channel_rel(model, variant, channel)
    try:
        data = storage.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        pointer = json.loads(data)
    except ValueError:
        pointer = None
    if not (isinstance(pointer, dict) and isinstance(pointer.get("version"), str)
            and isinstance(pointer.get("history", []), list)
            and all(isinstance(v, str) for v in pointer.get("history", []))):
        raise IntegrityError(f"channel file {storage.location(rel)} is malformed",
                             fix=f"restore it, or delete it and promote again: modelbuild promote "
                                 f"{model}/{variant}@VERSION --channel {channel}")
    return pointer


def channel_names(storage: Storage, model: str, variant: str) -> list[str]:
    return [n[:-5] for n in storage.list_dir(f"{model}/{variant}/channels") if n.endswith(".json") and not n.startswith(".")]


def channels(storage: Storage, model: str, variant: str) -> dict[str, str]:
    """``{channel: version}`` of one variant (IntegrityError on a malformed channel file)."""
    out = {}
    for name in channel_names(storage, model, variant):
        pointer = read_channel(storage, model, variant, name)
        if pointer is not None:
            out[name] = pointer["version"]
    return out


def pinned_versions(storage: Storage, model: str, variant: str) -> set[str]:
    """Every version a channel names now, and every version in the history of a promoted channel
    (what ``rollback`` may return to). ``latest`` moves on every publish, so its history is the
    publish log itself: it pins only its current version, or no version would ever be collected."""
    pinned: set[str] = set()
    for name in channel_names(storage, model, variant):
        pointer = read_channel(storage, model, variant, name)
        if pointer is not None:
            pinned |= {pointer["version"], *(pointer.get("history", []) if name != "latest" else [])}
    return pinned


def move_channel(storage: Storage, model: str, variant: str, channel: str, version: str) -> dict[str, Any]:
    """Point ``channel`` at ``version``, keeping where it pointed before (for ``rollback``)."""

    read_channel(storage, model, variant, channel)  # a malformed pointer stops here, untouched

    def change(old: dict[str, Any]) -> dict[str, Any]:
        history = list(old.get("history", []))
        if old.get("version") and old["version"] != version:
            history.append(old["version"])
        return {"channel": channel, "version": version, "history": history[-20:],
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    return update(storage, channel_rel(model, variant, channel), change, dict)


def rollback_channel(storage: Storage, model: str, variant: str, channel: str) -> dict[str, Any]:
    """Move ``channel`` back to the newest earlier version that still exists."""
    existing = set(versions(storage, model, variant))
    read_channel(storage, model, variant, channel)  # a malformed pointer stops here, untouched

    def change(old: dict[str, Any]) -> dict[str, Any]:
        if not old:
            raise StorageError(f"no channel {channel!r} for {model}/{variant}",
                               fix=f"promote a version first: modelbuild promote {model}/{variant}@VERSION --channel {channel}")
        history = list(old.get("history", []))
        while history and history[-1] not in existing:
            history.pop()
        if not history:
            raise StorageError(f"channel {channel!r} of {model}/{variant} has no earlier version to roll back to",
                               fix="promote a version explicitly")
        return {**old, "version": history.pop(), "history": history,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    return update(storage, channel_rel(model, variant, channel), change, dict)


# -- resolving references -----------------------------------------------------------------------


def resolve(storage: Storage, ref: Ref) -> tuple[str, dict[str, Any], bytes]:
    """The version a ``MODEL/VARIANT[@VERSION|@CHANNEL]`` names, with its manifest (parsed, raw).

    Raises:
        StorageError: no such model/variant/version/channel (saying what exists), or a channel
            pointing at a version that was deleted.
    """
    variant = ref.variant_name()
    base = f"{ref.model}/{variant}"
    known = versions(storage, ref.model, variant)
    if not known:
        variants = storage.list_dir(ref.model)
        what = (f"variants of {ref.model}: {', '.join(variants)}" if variants else
                f"models: {', '.join(m for m in storage.list_dir('') if not m.startswith('.') and m != INDEX) or 'none'}")
        raise StorageError(f"nothing published as {base} in {storage.url}", fix=f"pick one of the {what}")
    at = ref.at or "latest"
    if at in known:
        version = at
    else:
        pointers = channels(storage, ref.model, variant)
        if at not in pointers:
            raise StorageError(f"{base} has no version or channel {at!r}",
                               fix=f"channels: {', '.join(sorted(pointers)) or 'none'}; versions: {', '.join(known)}")
        version = pointers[at]
        if version not in known:
            raise StorageError(f"channel {at!r} of {base} points at version {version}, which no longer exists",
                               fix=f"promote another version: modelbuild promote {base}@VERSION --channel {at}")
    raw = storage.read_bytes(f"{base}/{version}/{MANIFEST}")
    return version, parse_manifest(raw, f"{base}@{version}"), raw
