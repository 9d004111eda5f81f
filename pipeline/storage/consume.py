"""What serving teams do with a store: select a variant, pull it with verification, check it,
and keep the store tidy (channels, retention)."""

from __future__ import annotations

import calendar
import json
import re
import secrets
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline import engines
from pipeline.errors import IntegrityError, StorageError
from pipeline.hardware import GPU_COMPUTE_CAPABILITY, compute_capability
from pipeline.hashing import sha256_file
from pipeline.storage.base import Storage
from pipeline.storage.location import check_name
from pipeline.storage.manifest import file_problems
from pipeline.storage.refs import Ref
from pipeline.storage.registry import (
    CLAIMS,
    INDEX,
    MANIFEST,
    pinned_versions,
    read_index,
    remove_entries,
    resolve,
    versions,
)

# -- select -------------------------------------------------------------------------------------


def latest_entries(index: dict[str, Any], model: str | None = None) -> list[dict[str, Any]]:
    """The newest version of every variant (versions sort by their UTC time prefix)."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for e in index.get("entries", []):
        if model is not None and e["model"] != model:
            continue
        key = (e["model"], e["variant"])
        if key not in newest or e["version"] > newest[key]["version"]:
            newest[key] = e
    return [newest[k] for k in sorted(newest)]


def _runs_on(entry: dict[str, Any], engine: engines.Engine, gpu: str) -> bool:
    if gpu.lower() == "cpu":
        return engine.cpu
    cc = compute_capability(gpu)
    if cc is None:  # select refused unknown GPUs before filtering
        raise StorageError(f"unknown GPU {gpu!r}", where="--gpu",
                           fix=f"use cpu or one of: {', '.join(GPU_COMPUTE_CAPABILITY)}")
    low, high = engines.gpu_range(entry.get("gpus", {}), engine.id)
    return (low is None or cc >= low) and (high is None or cc < high)


def select(index: dict[str, Any], *, engine: str, gpu: str, max_gb: float | None, max_kld: float | None,
           model: str | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """The best variant for a target: among the newest versions that passed their gate, load in
    ``engine`` (an id, or the legacy ``llama.cpp``), run on ``gpu``, fit ``max_gb`` (10^9 bytes)
    and ``max_kld`` (mean KLD vs the baseline), the one with the lowest mean KLD (then the
    smallest). Index entries may spell their engines either way.

    Returns:
        ``(entry or None, why)``: ``why`` counts what each condition left, for a "none matches".
    """
    pool, why = candidates(index, engine=engine, gpu=gpu, max_gb=max_gb, max_kld=max_kld, model=model)
    if not pool:
        return None, why
    best = min(pool, key=lambda e: (e.get("metrics", {}).get("mean_kld", float("inf")), e.get("size_bytes") or 0))
    return best, why


def candidates(index: dict[str, Any], *, engine: str, gpu: str, max_gb: float | None, max_kld: float | None,
               model: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The entries ``select`` chooses among (its conditions, in its order), and ``why``: how many
    each condition left."""
    chosen = engines.find(engine)
    if chosen is None:
        raise StorageError(f"unknown engine {engine!r}", where="--engine", fix=f"use one of: {', '.join(engines.IDS)}")
    if gpu.lower() != "cpu" and compute_capability(gpu) is None:
        raise StorageError(f"unknown GPU {gpu!r}", where="--gpu",
                           fix=f"use cpu or one of: {', '.join(GPU_COMPUTE_CAPABILITY)}")
    pool = latest_entries(index, model)
    if model and not pool:
        known = sorted({e["model"] for e in latest_entries(index)})
        raise StorageError(f"nothing published for model {model!r}", where="--model",
                           fix=f"pick one of the models: {', '.join(known) or 'none (publish one first)'}")
    why = [f"{len(pool)} variant(s) published" + (f" for {model}" if model else "")]
    steps = [
        ("passed their gate", lambda e: e.get("gate", {}).get("passed") is True),
        (f"load in {chosen.name}", lambda e: engines.loads(e.get("engines", []), chosen.id)),
        (f"run on {gpu}", lambda e: _runs_on(e, chosen, gpu)),
    ]
    if max_gb is not None:
        steps.append((f"fit in {max_gb:g} GB", lambda e: (e.get("size_bytes") or 0) <= max_gb * 1e9))
    if max_kld is not None:
        steps.append((f"have mean KLD <= {max_kld:g}",
                      lambda e: e.get("metrics", {}).get("mean_kld") is not None and e["metrics"]["mean_kld"] <= max_kld))
    for label, keep in steps:
        pool = [e for e in pool if keep(e)]
        why.append(f"{len(pool)} {label}")
    return pool, why


# -- pull and verify ----------------------------------------------------------------------------


def index_problem(storage: Storage, model: str, variant: str, version: str, raw: bytes) -> str | None:
    """How the manifest ``raw`` disagrees with its registry entry (None: it agrees, or the
    version is not indexed yet: a publisher killed before registering it, completed by a rerun)."""
    from pipeline.hashing import digest_bytes

    for e in read_index(storage).get("entries", []):
        if (e["model"], e["variant"], e["version"]) == (model, variant, version):
            if e.get("manifest_sha256") != digest_bytes(raw):
                return (f"manifest of {model}/{variant}@{version} does not match its registry entry "
                        f"(sha256 {digest_bytes(raw)[:12]}…, index says {str(e.get('manifest_sha256'))[:12]}…)")
            return None
    return None


def verify(storage: Storage, ref: Ref, *, against_index: bool = True) -> tuple[str, str, list[str]]:
    """The one check behind ``verify`` and ``reindex``, the same ``pull`` makes before moving
    anything into place: the manifest parses and its paths stay inside the version folder
    (:func:`~pipeline.storage.manifest.parse_manifest`), its bytes equal the index's record, and
    every file has its recorded size and sha256 (no file missing, none extra on a filesystem).

    ``against_index=False`` leaves the index out (``reindex``, which is rebuilding it).

    Returns:
        ``(version, location, problems)``; no problems means the version is whole.
    """
    version, manifest, raw = resolve(storage, ref)
    rel = f"{ref.model}/{ref.variant}/{version}"
    problems = [p for p in [against_index and index_problem(storage, ref.model, ref.variant_name(), version, raw)]
                if p]
    local = storage.local_path(rel)
    if local is not None:
        problems += file_problems(local, manifest)
    else:  # a remote store: stream every file through a checked pull into a scratch folder
        scratch = Path(tempfile.mkdtemp(prefix="modelbuild-verify-"))
        try:
            _download_checked(storage, rel, manifest, scratch)
        except IntegrityError as e:
            problems.append(e.message)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return version, storage.location(rel), problems


def pull(storage: Storage, ref: Ref, dest: Path, *, jobs: int = 8) -> dict[str, Any]:
    """Download a published version into ``dest``, every file checked against the manifest's
    sha256 before the folder is moved into place (the checks of :func:`verify`).

    Files land in ``.<dest name>.partial-<version>`` beside ``dest``: an interrupted pull
    resumes there (files already complete and correct are kept), a mismatch removes it.

    Raises:
        StorageError: unknown reference; ``dest`` exists with other content.
        IntegrityError: a file or the manifest does not match.
    """
    version, manifest, raw = resolve(storage, ref)
    problem = index_problem(storage, ref.model, ref.variant_name(), version, raw)
    if problem:
        raise IntegrityError(problem, fix="the store was changed by hand: republish the variant "
                                          "(`modelbuild reindex` indexes only versions whose files match)")
    dest = Path(dest).resolve()
    if dest.exists() and any(dest.iterdir()):
        if (dest / MANIFEST).is_file() and (dest / MANIFEST).read_bytes() == raw:
            return {"status": "already pulled", "path": str(dest), "version": version, "files": len(manifest["files"])}
        raise StorageError(f"{dest} exists and is not empty", where="DEST", fix="give a new or empty folder")
    partial = dest.with_name(f".{dest.name}.partial-{version}")
    started = time.perf_counter()
    _download_checked(storage, f"{ref.model}/{ref.variant}/{version}", manifest, partial, jobs=jobs)
    (partial / MANIFEST).write_bytes(raw)
    if dest.exists():
        dest.rmdir()
    partial.rename(dest)
    size = sum(r["size"] for r in manifest["files"])
    return {"status": "pulled", "path": str(dest), "version": version, "files": len(manifest["files"]),
            "bytes": size, "seconds": round(time.perf_counter() - started, 3)}


def _download_checked(storage: Storage, base: str, manifest: dict[str, Any], partial: Path, *, jobs: int = 8) -> None:
    """Every file of a checked manifest into ``partial``, each sha256-checked (files already
    there and correct are kept: a resumed pull); IntegrityError, and ``partial`` removed, on a
    mismatch."""
    partial.mkdir(parents=True, exist_ok=True)

    def fetch(record: dict[str, Any]) -> str | None:
        target = partial / record["path"]
        if target.is_file() and target.stat().st_size == record["size"] and sha256_file(target) == record["sha256"]:
            return None  # resumed
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        try:
            digest = storage.download(f"{base}/{record['path']}", tmp) or sha256_file(tmp)
            if digest != record["sha256"]:
                return record["path"]
            tmp.replace(target)
        except FileNotFoundError:
            return record["path"]
        finally:
            tmp.unlink(missing_ok=True)
        return None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        bad = [p for p in pool.map(fetch, manifest["files"]) if p is not None]
    if bad:
        shutil.rmtree(partial, ignore_errors=True)
        raise IntegrityError(f"{len(bad)} file(s) of {base} do not match the manifest: {', '.join(bad[:5])}",
                             fix="nothing was kept; the stored copy is damaged: republish it")
    expected = {r["path"] for r in manifest["files"]} | {MANIFEST}
    for stray in [p for p in partial.rglob("*") if p.is_file() and p.relative_to(partial).as_posix() not in expected]:
        stray.unlink()


# -- channels and retention ---------------------------------------------------------------------

_STAMP = re.compile(r"(\d{8}T\d{6}Z)")


def _age_s(name: str) -> float | None:
    m = _STAMP.search(name)
    if not m:
        return None
    return time.time() - calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%SZ"))


def gc(storage: Storage, *, keep: int, model: str | None = None, grace_s: float = 3600.0,
       dry_run: bool = False) -> list[str]:
    """Delete all but the newest ``keep`` versions of every variant, never one a channel points
    at, plus leftovers of interrupted publishes older than ``grace_s`` (a younger one may still
    be uploading): manifest-less version folders, and on S3 unfinished multipart uploads.
    Returns what was (or would be) deleted."""
    if keep < 1:
        raise StorageError("gc --keep must be at least 1", where="--keep", fix="keep at least the newest version")
    models = [check_name(model, "model")] if model else [
        m for m in storage.list_dir("") if not m.startswith(".") and m != INDEX]
    deleted, gone = [], set()
    for m in models:
        for variant in storage.list_dir(m):
            known = versions(storage, m, variant)
            # Every channel is read before anything is chosen: a malformed one stops gc (exit 5)
            # rather than be skipped, and a version in a channel's history stays for rollback.
            pinned = pinned_versions(storage, m, variant)
            for version in known[:-keep]:
                if version not in pinned:
                    deleted.append(f"{m}/{variant}/{version}")
                    gone.add((m, variant, version))
            for leftover in storage.incomplete_versions(f"{m}/{variant}"):
                # The younger of its name's time and its last change: a rerun publishing into a
                # version name claimed long ago is busy now, whatever its name says.
                changed = storage.modified(f"{m}/{variant}/{leftover}")
                ages = [a for a in (_age_s(leftover), None if changed is None else time.time() - changed)
                        if a is not None]
                if ages and min(ages) > grace_s:
                    deleted.append(f"{m}/{variant}/{leftover}")
    aborts = []
    for m in models:
        for path, upload_id, started in storage.unfinished_uploads(m):
            # Aged like a leftover folder, by the version name in its path (the store's own
            # clock); the start time the server reports is only the fallback.
            age = _age_s(path)
            if (age if age is not None else time.time() - started) > grace_s:
                aborts.append((path, upload_id))
    listed = deleted + [f"{path} (unfinished upload)" for path, _id in aborts]
    if dry_run:
        return listed
    for path, upload_id in aborts:
        storage.abort_upload(path, upload_id)
    if gone:
        remove_entries(storage, gone)  # first: a reader never finds an indexed version missing
    for rel in deleted:
        storage.delete_tree(rel)
    _drop_claims(storage, gone)
    return listed


def _drop_claims(storage: Storage, gone: set[tuple[str, str, str]]) -> None:
    """Forget the version names claimed for deleted versions, so that rebuilding one of their
    builds publishes a new version (named now) instead of reviving the old name."""
    for m, variant in {(m, v) for m, v, _version in gone}:
        for name in storage.list_dir(f"{m}/{variant}/{CLAIMS}"):
            rel = f"{m}/{variant}/{CLAIMS}/{name}"
            try:
                claimed = json.loads(storage.read_bytes(rel)).get("version")
            except (FileNotFoundError, ValueError, AttributeError):
                continue
            if (m, variant, claimed) in gone:
                storage.delete_tree(rel)


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: manifest.get(k) for k in (
        "model", "variant", "version", "created", "format", "size_bytes", "metrics", "gate", "source", "tools",
        "serve", "serving_profiles")}))
