"""Deployment files generated from the registry: N serving replicas of one published variant
behind a load balancer, weights read from the shared store, each replica ready only when its
engine answers ``/health``.

Docker Compose is the format (``docker compose up``): one service per replica running the
engine's official image with the variant's serving profile, an nginx load balancer that waits
for every replica to be healthy, and, for an S3 store, a one-shot ``fetch`` service that copies
the version with the AWS CLI and checks every file against the manifest's sha256 before any
replica starts. A filesystem store (local or NFS) is mounted read-only instead: every replica
reads the same immutable version folder.

The version is pinned (resolved from a channel at generation time), so a deployment is
reproducible; regenerate to roll forward.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline import engines
from pipeline.errors import StorageError

MOUNT = "/models"
LB_IMAGE = "nginx:1.27-alpine"
AWS_CLI_IMAGE = "amazon/aws-cli:latest"


def pick_profile(manifest: dict[str, Any], engine: str | None, profile: str | None) -> dict[str, Any]:
    """The profile named ``profile``, else the manifest's first profile for ``engine`` (an id;
    profiles of manifests published with the legacy spelling match too), else its first.

    Raises:
        StorageError: no such profile.
    """
    profiles = manifest.get("serving_profiles") or []
    if profile is not None:
        found = [p for p in profiles if p["name"] == profile]
    else:
        found = [p for p in profiles if engine is None or engines.canonical(p["engine"]) == engine]
    if not found:
        names = ", ".join(p["name"] for p in profiles) or "none"
        wanted = f" {profile}" if profile else f" for {engine}" if engine else "s"
        raise StorageError(f"{manifest['model']}/{manifest['variant']}@{manifest['version']} has no serving profile"
                           f"{wanted}", where="--profile", fix=f"profiles: {names}")
    return found[0]


def compose(
    *, manifest: dict[str, Any], storage_url: str, location: str, profile: dict[str, Any], replicas: int,
    local_root: str | None, port: int = 8000, cpus_per_replica: int | None = None,
) -> dict[str, str]:
    """The deployment's files: ``docker-compose.yml``, ``nginx.conf`` (+ ``SHA256SUMS`` for S3).

    Args:
        manifest: the version's manifest.
        storage_url: the store (shown in the header).
        location: where the version lives in the store (its folder or s3:// URL).
        profile: one of the manifest's serving profiles.
        replicas: how many engine replicas.
        local_root: the store's root folder when it is a filesystem (mounted read-only), else None.
        cpus_per_replica: CPU cores each replica of a CPU engine may use (Compose's ``cpus``) and
            computes on (the engine's thread flags); None leaves both to the engine, which takes
            every core of the host.

    Raises:
        StorageError: fewer than one replica or core, or cores for an engine that runs on GPUs.
    """
    if replicas < 1:
        raise StorageError("--replicas must be at least 1", where="--replicas", fix="give a positive number")
    engine = engines.get(profile["engine"])  # either spelling: the profile comes from a stored manifest
    if cpus_per_replica is not None and cpus_per_replica < 1:
        raise StorageError("--cpus-per-replica must be at least 1", where="--cpus-per-replica",
                           fix="give a whole number of cores")
    if cpus_per_replica is not None and not engine.thread_flags:
        raise StorageError(f"--cpus-per-replica is for CPU engines; {engine.name} replicas compute on GPUs",
                           where="--cpus-per-replica", fix="leave it out, or deploy a llama.cpp profile")
    rel = f"{manifest['model']}/{manifest['variant']}/{manifest['version']}"
    in_container = f"{MOUNT}/{rel}"
    # The profile's command, with the version's folder as the replica sees it.
    argv = profile["command"].replace(location, in_container).split()
    if cpus_per_replica is not None:
        argv = _with_flags(argv, dict.fromkeys(engine.thread_flags, str(cpus_per_replica)))
    engine_port = engine.port
    for flag in ("--port",):
        if flag in argv:
            engine_port = int(argv[argv.index(flag) + 1])
    services: dict[str, Any] = {}
    files: dict[str, str] = {}
    volume = f"{local_root}:{MOUNT}:ro" if local_root else f"weights:{MOUNT}:ro"
    if local_root is None:
        files["SHA256SUMS"] = "".join(f"{f['sha256']}  {f['path']}\n" for f in manifest["files"])
        services["fetch"] = {
            "image": AWS_CLI_IMAGE,
            "entrypoint": ["/bin/sh", "-c"],
            # Copy the version, then refuse it unless every file matches the manifest.
            "command": [f"aws s3 cp --recursive --only-show-errors {location} {in_container} && "
                        f"cd {in_container} && sha256sum -c /deploy/SHA256SUMS"],
            "environment": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                            "AWS_ENDPOINT_URL"],
            "volumes": [f"weights:{MOUNT}", "./SHA256SUMS:/deploy/SHA256SUMS:ro"],
            "restart": "no",
        }
    gpus = profile.get("tp", 1) * profile.get("pp", 1) if not engine.cpu or profile.get("gpus") else 0
    for i in range(1, replicas + 1):
        service: dict[str, Any] = {
            "image": engine.image,
            "volumes": [volume],
            "healthcheck": {
                "test": ["CMD", "curl", "-fsS", f"http://localhost:{engine_port}/health"],
                "interval": "10s", "timeout": "5s", "retries": 3, "start_period": "120s",
            },
            "restart": "unless-stopped",
        }
        if engine.image_runs_server:
            service["command"] = argv[1:]
        else:
            service["entrypoint"] = argv[:1]
            service["command"] = argv[1:]
        if engine.ipc_host:
            service["ipc"] = "host"
        if cpus_per_replica is not None:
            service["cpus"] = cpus_per_replica
        if gpus:
            service["deploy"] = {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "count": gpus, "capabilities": ["gpu"]}]}}}
        if local_root is None:
            service["depends_on"] = {"fetch": {"condition": "service_completed_successfully"}}
        services[f"replica-{i}"] = service
    services["lb"] = {
        "image": LB_IMAGE,
        "volumes": ["./nginx.conf:/etc/nginx/nginx.conf:ro"],
        "ports": [f"{port}:80"],
        "depends_on": {f"replica-{i}": {"condition": "service_healthy"} for i in range(1, replicas + 1)},
        "restart": "unless-stopped",
    }
    doc: dict[str, Any] = {"services": services}
    if local_root is None:
        doc["volumes"] = {"weights": {}}
    header = (f"# {rel} ({manifest['format']['format']} {manifest['format']['scheme']}) served by {engine.name} "
              f"with profile {profile['name']}, {replicas} replica(s) behind nginx.\n"
              f"# Generated by `modelbuild deploy` from {storage_url}; regenerate rather than edit.\n"
              f"# Start: docker compose -p {_project(manifest)} up -d\n")
    if shares_cores(engine, replicas, cpus_per_replica):
        header += (f"# The {replicas} replicas share the host's cores: each {engine.name} server computes on all of "
                   "them; on one host, regenerate with --cpus-per-replica.\n")
    files["docker-compose.yml"] = header + yaml.safe_dump(doc, sort_keys=False, width=120)
    files["nginx.conf"] = _nginx(replicas, engine_port)
    return files


def shares_cores(engine: engines.Engine, replicas: int, cpus_per_replica: int | None) -> bool:
    """Whether the replicas of a CPU engine would each compute on every core of a shared host:
    several on one host then oversubscribe it (measured in benchmarks/balancer.py)."""
    return bool(engine.thread_flags) and replicas > 1 and cpus_per_replica is None


def _with_flags(argv: list[str], flags: dict[str, str]) -> list[str]:
    """``argv`` with each flag set to its value: replaced where the command has it, else added."""
    argv = list(argv)
    for flag, value in flags.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def _project(manifest: dict[str, Any]) -> str:
    name = f"{manifest['model']}-{manifest['variant']}".lower()
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _nginx(replicas: int, engine_port: int) -> str:
    servers = "\n".join(f"        server replica-{i}:{engine_port} max_fails=3 fail_timeout=10s;"
                        for i in range(1, replicas + 1))
    return f"""# Least connections over the replicas; a replica that fails is skipped for fail_timeout.
events {{}}
http {{
    upstream replicas {{
        least_conn;
{servers}
    }}
    server {{
        listen 80;
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;          # stream tokens as the engine produces them
            proxy_read_timeout 600s;
            # A replica that dies drops the requests it was generating; a completion has no side
            # effects, so they are passed to the next replica too (POST is retried only with
            # non_idempotent). Tokens already streamed to a client cannot be taken back.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
        }}
    }}
}}
"""
