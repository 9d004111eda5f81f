"""Consumer commands on a store, grouped as ``modelbuild store ...``: ``list``, ``show``, ``select``,
``pull``, ``verify`` (in ``inspect``), ``promote``, ``rollback``, ``gc``, ``reindex``, ``deploy``,
``push-hub``. Each takes ``--storage`` (a folder or ``s3://...``; the endpoint and credentials from
the AWS variables) and, where a script would read it, ``--json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline import engines
from pipeline.cli.options import JsonOpt, StorageOpt, storage_url

# No brackets in help texts: rich reads "[@VERSION]" as markup and drops it from the page.
RefArg = Annotated[str, typer.Argument(help="MODEL, MODEL/VARIANT, MODEL/VARIANT@VERSION or MODEL/VARIANT@CHANNEL.",
                                       show_default=False, metavar="REF")]


def register(app: typer.Typer) -> None:
    """Every command under ``modelbuild store``, and under the same name at the top level, hidden
    from its help: the top-level names came first, and scripts call them."""
    from pipeline.cli.inspect import verify

    store = typer.Typer(help="The published store: list, inspect, pull, verify, move channels, clean up, deploy.",
                        no_args_is_help=True)
    for command in (list_, show, select, pull, verify, promote, rollback, gc, reindex, deploy, push_hub):
        name = command.__name__.rstrip("_").replace("_", "-")
        store.command(name=name)(command)
        app.command(name=name, hidden=True)(command)
    app.add_typer(store, name="store")


def _open(url: str | None):
    from pipeline.storage.location import open_storage

    return open_storage(storage_url(url))


def _gb(n: Any) -> str:
    return f"{n / 1e9:.3f}" if isinstance(n, (int, float)) else "?"


def _kld(e: dict[str, Any]) -> str:
    from pipeline.figures import kld

    return kld(e.get("metrics", {}).get("mean_kld"))


def _min_gpu(e: dict[str, Any]) -> str:
    cc = e.get("min_compute_capability")
    return "any / CPU" if cc is None else f"sm {cc:g}+"


def list_(storage: StorageOpt = None,
          model: Annotated[str | None, typer.Option(help="Only this model.", show_default="every model")] = None,
          json_: JsonOpt = False) -> None:
    """Every published version in the store's registry index."""
    from pipeline.storage.registry import read_index

    store = _open(storage)
    entries = [e for e in read_index(store)["entries"] if model is None or e["model"] == model]
    if json_:
        typer.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        typer.echo(f"nothing published in {store.url}")
        return
    typer.echo(f"{'model/variant@version':<70} {'format':<18} {'engines':<28} {'min GPU':<10} {'GB':>7} {'mean KLD':>12}")
    for e in entries:
        ref = f"{e['model']}/{e['variant']}@{e['version']}"
        typer.echo(f"{ref:<70} {str(e.get('format')):<18} {','.join(e.get('engines', [])):<28} {_min_gpu(e):<10} "
                   f"{_gb(e.get('size_bytes')):>7} {_kld(e):>12}")


def show(ref: RefArg, storage: StorageOpt = None, json_: JsonOpt = False) -> None:
    """A model's variants, a variant's versions and channels, or one version's manifest."""
    from pipeline.storage.consume import manifest_summary
    from pipeline.storage.refs import parse_ref
    from pipeline.storage.registry import channels, read_index, resolve, versions

    store = _open(storage)
    parsed = parse_ref(ref)
    if parsed.variant is None:
        entries = [e for e in read_index(store)["entries"] if e["model"] == parsed.model]
        if not entries:
            from pipeline.errors import StorageError

            raise StorageError(f"nothing published for model {parsed.model} in {store.url}",
                               fix="see what exists with: modelbuild list")
        out: Any = sorted({e["variant"] for e in entries})
        if json_:
            typer.echo(json.dumps(out))
        else:
            for variant in out:
                typer.echo(f"{parsed.model}/{variant}")
        return
    if parsed.at is None:
        resolve(store, parsed)  # says what exists when nothing does
        out = {"versions": versions(store, parsed.model, parsed.variant),
               "channels": channels(store, parsed.model, parsed.variant)}
        if json_:
            typer.echo(json.dumps(out, indent=2))
        else:
            pointed: dict[str, list[str]] = {}
            for channel, version in out["channels"].items():
                pointed.setdefault(version, []).append(channel)
            for version in out["versions"]:
                typer.echo(f"{parsed.model}/{parsed.variant}@{version}  {' '.join(sorted(pointed.get(version, [])))}")
        return
    version, manifest, _raw = resolve(store, parsed)
    summary = manifest_summary(manifest)
    if json_:
        typer.echo(json.dumps(summary, indent=2))
        return
    fmt = summary.get("format") or {}
    typer.echo(f"{parsed.model}/{parsed.variant}@{version}  ({store.location(f'{parsed.model}/{parsed.variant}/{version}')})")
    typer.echo(f"  format: {fmt.get('format')} {fmt.get('scheme')}, {_gb(summary.get('size_bytes'))} GB, "
               f"engines: {', '.join(fmt.get('engines', []))}")
    metrics = summary.get("metrics") or {}
    typer.echo("  quality: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    for engine, command in (summary.get("serve") or {}).items():
        typer.echo(f"  serve ({engine}): {command}")


def select(
    engine: Annotated[str, typer.Option(help=engines.either(engines.IDS) + ".")],
    gpu: Annotated[str, typer.Option(help="H100, L40S, A100, B200, ... or cpu.")],
    max_gb: Annotated[float | None, typer.Option("--max-gb", help="Largest size on disk, in GB (10^9 bytes).",
                                                 show_default="no limit")] = None,
    max_kld: Annotated[float | None, typer.Option("--max-kld", help="Largest mean KLD vs the unquantized model.",
                                                  show_default="no limit")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.", show_default="every model")] = None,
    storage: StorageOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Print the best matching variant's path (lowest mean KLD that fits), or why none matches."""
    from pipeline.errors import StorageError
    from pipeline.storage.consume import select as pick
    from pipeline.storage.registry import read_index

    store = _open(storage)
    best, why = pick(read_index(store), engine=engine, gpu=gpu, max_gb=max_gb, max_kld=max_kld, model=model)
    if best is None:
        raise StorageError("no published variant matches: " + ", ".join(why),
                           fix="loosen --max-gb/--max-kld, or build a variant for this target")
    path = store.location(f"{best['model']}/{best['variant']}/{best['version']}")
    if json_:
        typer.echo(json.dumps({**best, "ref": f"{best['model']}/{best['variant']}@{best['version']}", "path": path}, indent=2))
    else:
        typer.echo(path)


def pull(
    ref: RefArg,
    dest: Annotated[Path, typer.Argument(help="New or empty folder to pull into.", show_default=False)],
    storage: StorageOpt = None,
    jobs: Annotated[int, typer.Option(help="Parallel downloads.")] = 8,
    json_: JsonOpt = False,
) -> None:
    """Download a published variant, checking every file's sha256 before it is moved into place."""
    from pipeline.storage.consume import pull as do_pull
    from pipeline.storage.refs import parse_ref

    result = do_pull(_open(storage), parse_ref(ref), dest, jobs=jobs)
    if json_:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(f"{result['status']}: {ref} ({result['version']}, {result['files']} files) → {result['path']}")


def promote(
    ref: RefArg,
    channel: Annotated[str, typer.Option(help="Channel to move, e.g. stable.")],
    storage: StorageOpt = None,
) -> None:
    """Point a channel at a version (MODEL/VARIANT@VERSION, or @CHANNEL to copy another channel)."""
    from pipeline.storage.location import check_name
    from pipeline.storage.refs import parse_ref
    from pipeline.storage.registry import move_channel, resolve

    store = _open(storage)
    parsed = parse_ref(ref)
    version, _manifest, _raw = resolve(store, parsed)
    move_channel(store, parsed.model, parsed.variant_name(), check_name(channel, "channel"), version)
    typer.echo(f"{parsed.model}/{parsed.variant}@{channel} → {version}")


def rollback(
    ref: RefArg,
    channel: Annotated[str, typer.Option(help="Channel to move back.")] = "stable",
    storage: StorageOpt = None,
) -> None:
    """Move a channel back to the version it pointed at before."""
    from pipeline.storage.location import check_name
    from pipeline.storage.refs import parse_ref
    from pipeline.storage.registry import rollback_channel

    parsed = parse_ref(ref)
    if parsed.variant is None:
        from pipeline.errors import StorageError

        raise StorageError(f"{ref} names a model, not a variant", fix="write MODEL/VARIANT")
    moved = rollback_channel(_open(storage), parsed.model, parsed.variant, check_name(channel, "channel"))
    typer.echo(f"{parsed.model}/{parsed.variant}@{channel} → {moved['version']}")


def gc(
    keep: Annotated[int, typer.Option(help="Versions to keep per variant (channel targets are always kept).")],
    storage: StorageOpt = None,
    model: Annotated[str | None, typer.Option(help="Only this model.", show_default="every model")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would go; delete nothing.")] = False,
    grace_minutes: Annotated[float, typer.Option(
        help="Leave leftovers younger than this alone: a publisher may still be uploading them.")] = 60,
) -> None:
    """Delete old versions and leftovers of interrupted publishes."""
    from pipeline.storage.consume import gc as collect

    gone = collect(_open(storage), keep=keep, model=model, dry_run=dry_run, grace_s=grace_minutes * 60)
    for rel in gone:
        typer.echo(("would delete " if dry_run else "deleted ") + rel)
    typer.echo(f"{len(gone)} item(s) {'to delete' if dry_run else 'deleted'}")


def reindex(storage: StorageOpt = None) -> None:
    """Rebuild the registry index from the manifests in the store, indexing only versions whose
    files match their manifest (the others are listed; exit 5 when there are any)."""
    from pipeline.errors import IntegrityError
    from pipeline.storage.consume import verify
    from pipeline.storage.refs import Ref
    from pipeline.storage.registry import reindex as rebuild

    store = _open(storage)
    index, left_out = rebuild(store, lambda m, v, version: verify(store, Ref(m, v, version), against_index=False)[2])
    for line in left_out:
        typer.echo(f"not indexed: {line}", err=True)
    typer.echo(f"index rebuilt: {len(index['entries'])} version(s)")
    if left_out:
        raise IntegrityError(f"{len(left_out)} version(s) left out of the index: their files do not match their "
                             "manifest", fix="republish them, or restore their files and run reindex again")


def deploy(
    ref: RefArg,
    out: Annotated[Path, typer.Argument(help="Folder to write docker-compose.yml and nginx.conf into.", show_default=False)],
    replicas: Annotated[int, typer.Option(help="Engine replicas behind the load balancer.")] = 2,
    engine: Annotated[str | None, typer.Option(help=engines.either(
        e.id for e in engines.CATALOGUE if e.profiles) + ".",
                                               show_default="the first profile's")] = None,
    profile: Annotated[str | None, typer.Option(help="A serving profile by name (see `show REF`).",
                                                show_default="the first of --engine's")] = None,
    port: Annotated[int, typer.Option(help="Port the load balancer listens on.")] = 8000,
    mount_from: Annotated[str | None, typer.Option(
        "--mount-from", help="A filesystem store's path on the serving hosts (e.g. its NFS mount point).",
        show_default="its path here")] = None,
    cpus_per_replica: Annotated[int | None, typer.Option(
        "--cpus-per-replica", help="CPU cores each replica of a CPU engine may use and computes on "
        "(its thread flags); replicas × cores at most the host's when they share one.",
        show_default="all of the host's")] = None,
    storage: StorageOpt = None,
) -> None:
    """Write a Docker Compose deployment of a published variant: N replicas, nginx, health checks."""
    from pipeline.publishing.deploy import compose, pick_profile, shares_cores
    from pipeline.storage.refs import parse_ref
    from pipeline.storage.registry import resolve

    store = _open(storage)
    parsed = parse_ref(ref)
    version, manifest, _raw = resolve(store, parsed)
    rel = f"{parsed.model}/{parsed.variant}/{version}"
    chosen = pick_profile(manifest, (engines.canonical(engine) or engine) if engine else None, profile)
    root = store.local_path("")
    files = compose(manifest=manifest, storage_url=store.url, location=store.location(rel), profile=chosen,
                    replicas=replicas, local_root=(mount_from or str(root)) if root is not None else None, port=port,
                    cpus_per_replica=cpus_per_replica)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    typer.echo(f"{parsed.model}/{parsed.variant}@{version}: {replicas} x {chosen['name']} → {out} "
               f"({', '.join(sorted(files))}); start with: docker compose -f {out / 'docker-compose.yml'} up -d")
    if shares_cores(engines.get(chosen["engine"]), replicas, cpus_per_replica):
        typer.echo(f"note: each of the {replicas} replicas computes on every core of its host; where they share one, "
                   "give --cpus-per-replica (replicas × cores at most the host's)", err=True)


def push_hub(
    ref: RefArg,
    repo_id: Annotated[str, typer.Argument(help="Hub model repo, e.g. my-org/SmolLM2-135M-Instruct-FP8.",
                                           show_default=False)],
    public: Annotated[bool, typer.Option("--public", help="Create the repo public (default: private).")] = False,
    revision: Annotated[str | None, typer.Option(help="Branch to commit to.", show_default="main")] = None,
    storage: StorageOpt = None,
) -> None:
    """Upload a verified published version to a Hugging Face Hub repo (HF_TOKEN / hf auth login)."""
    from pipeline.storage.hub import push
    from pipeline.storage.refs import parse_ref

    done = push(_open(storage), parse_ref(ref), repo_id, private=not public, revision=revision)
    typer.echo(f"{ref} → {done['url']}")
