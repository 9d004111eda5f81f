"""A storage root in S3 or an S3-compatible store (MinIO, Ceph, ...), through s3fs.

``s3://bucket/prefix``. Endpoint and region come from the recipe (``publish.s3``) or the usual
AWS variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``); credentials only from the AWS chain
(environment, profile, instance role) — never from the recipe, never logged.

Metadata, reads and downloads go through s3fs; the files of a version go up through boto3's
transfer manager (s3transfer, what ``aws s3 cp`` runs on: 8 MiB parts, ten at a time across all
files), which moved a 2 GB variant 1.7x faster than s3fs's ``put`` against the same server
(``benchmarks/storage_throughput.py``).

S3 renames nothing, so a version is published by uploading its files first and its manifest
last: a version without ``manifest.json`` does not exist for readers, and a publisher killed
mid-upload leaves only such a leftover (``gc`` removes it; a rerun publishes afresh). The
manifest goes up with ``If-None-Match: *``, so of two publishers racing to one version exactly
one writes it.
Compare-and-swap on the index uses S3 conditional writes: ``If-None-Match: *`` to create,
``If-Match: <ETag>`` to replace. Transient failures (throttling, 5xx, dropped connections) are
retried with exponential backoff by botocore's standard retry mode; what still fails is reported
as a StorageError naming the bucket and endpoint.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import StorageError, ToolError
from pipeline.files import MANIFEST
from pipeline.hashing import digest_bytes, list_tree, parallel_map, sha256_file
from pipeline.storage.base import Records, Storage, check_expected

_RETRIES = 5
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "Forbidden", "403"}


def _code(e: BaseException) -> str:
    """The S3 error code behind an s3fs exception ('' when there is none)."""
    for err in (e, e.__cause__, e.__context__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


def _check_endpoint(endpoint: str) -> None:
    """Refuse, before any request, an endpoint that carries credentials or whose host does not
    resolve: neither gets better by retrying (botocore would retry the lookup for a minute), and
    credentials belong to the AWS chain, never to a URL that ends up in logs."""
    import socket
    from urllib.parse import urlsplit

    from pipeline.errors import redact

    parts = urlsplit(endpoint)
    if parts.username or parts.password:
        raise StorageError(f"the S3 endpoint {redact(endpoint)} carries credentials", where="publish.s3.endpoint_url",
                           fix="remove user:password@ from it; give them as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                               "or AWS_PROFILE")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(f"the S3 endpoint {endpoint!r} is not an http(s) URL", where="publish.s3.endpoint_url",
                           fix="write it like http://HOST:PORT or https://HOST")
    try:
        socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as e:
        raise StorageError(f"the S3 endpoint's host {parts.hostname!r} does not resolve ({e})",
                           where="publish.s3.endpoint_url", fix="check the endpoint URL and DNS") from None


class S3Storage(Storage):
    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None):
        try:
            import s3fs
        except ImportError:
            raise ToolError("s3fs is not installed, so s3:// storage cannot be used",
                            fix="pip install 'modelbuild[s3]'") from None
        rest = url[len("s3://"):].strip("/")
        self.bucket, _, self.prefix = rest.partition("/")
        if not self.bucket:
            raise StorageError(f"no bucket in storage URL {url!r}", where="publish.root", fix="write s3://BUCKET[/PREFIX]")
        self.url = f"s3://{rest}"
        self.endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if self.endpoint:
            _check_endpoint(self.endpoint)
        client_kwargs: dict[str, Any] = {}
        if self.endpoint:
            client_kwargs["endpoint_url"] = self.endpoint
        if region:
            client_kwargs["region_name"] = region
        self.fs = s3fs.S3FileSystem(
            client_kwargs=client_kwargs,
            config_kwargs={"retries": {"max_attempts": _RETRIES, "mode": "standard"}},
            use_listings_cache=False,  # other publishers change the store under us
            skip_instance_cache=True,
        )
        self._client_kwargs = client_kwargs

    # -- helpers ----------------------------------------------------------------------------

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel) if p)

    def _path(self, rel: str) -> str:
        return f"{self.bucket}/{self._key(rel)}".rstrip("/")

    def _where(self) -> str:
        return f"{self.url}" + (f" at {self.endpoint}" if self.endpoint else "")

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn what s3fs/botocore raise into one StorageError line; a missing object stays
        FileNotFoundError for the caller."""
        try:
            yield
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - botocore, aiohttp and OSError all surface here
            code = _code(e)
            if code == "NoSuchBucket" or "bucket does not exist" in str(e):
                raise StorageError(f"bucket {self.bucket!r} does not exist ({self._where()})", where="publish.root",
                                   fix=f"create it (aws s3 mb s3://{self.bucket}) or fix the storage URL") from None
            if code in _DENIED or isinstance(e, PermissionError):
                raise StorageError(f"S3 refused {doing} on {self._where()} ({code or e})", where="credentials",
                                   fix="check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and the "
                                       "bucket policy") from None
            if isinstance(e, FileNotFoundError):
                raise
            raise StorageError(f"S3 {doing} failed on {self._where()} after {_RETRIES} attempts: "
                               f"{code or e.__class__.__name__}: {str(e)[:200]}",
                               fix="check the endpoint and the network, then rerun") from None

    def _get(self, rel: str) -> tuple[bytes, str]:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(rel))
            async with resp["Body"] as body:
                return await body.read(), resp["ETag"]

        try:
            return sync(self.fs.loop, get)
        except Exception as e:  # noqa: BLE001
            if _code(e) == "NoSuchKey" or (isinstance(e, FileNotFoundError) and _code(e) != "NoSuchBucket"):
                raise FileNotFoundError(self._path(rel)) from None
            raise

    # -- the interface ----------------------------------------------------------------------

    def check_writable(self) -> None:
        probe = f".write-probe-{os.getpid()}"
        with self._errors("a test write"):
            self.fs.pipe_file(self._path(probe), b"")
            self.fs.rm_file(self._path(probe))

    def read_bytes(self, rel: str) -> bytes:
        with self._errors("a read"):
            return self._get(rel)[0]

    def read_versioned(self, rel: str) -> tuple[bytes | None, Any]:
        with self._errors("a read"):
            try:
                return self._get(rel)
            except FileNotFoundError:
                return None, None

    def write_if(self, rel: str, data: bytes, token: Any) -> bool:
        condition = {"IfNoneMatch": "*"} if token is None else {"IfMatch": token}
        with self._errors("a conditional write"):
            try:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._key(rel), Body=data, **condition)
            except Exception as e:  # noqa: BLE001
                if _code(e) in _CONFLICT or (token is None and isinstance(e, FileExistsError)):
                    return False
                raise
        return True

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self._errors("a write"):
            self.fs.pipe_file(self._path(rel), data)

    def list_dir(self, rel: str) -> list[str]:
        with self._errors("a listing"):
            try:
                found = self.fs.ls(self._path(rel) + "/", detail=False)
            except FileNotFoundError:
                return []
        return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in found})

    def list_files(self, rel: str) -> list[tuple[str, int]]:
        base = self._path(rel) + "/"
        with self._errors("a listing"):
            found = self.fs.find(base, detail=True)
        return sorted((path[len(base):], int(info["size"])) for path, info in found.items() if path.startswith(base))

    def exists(self, rel: str) -> bool:
        with self._errors("a lookup"):
            return bool(self.fs.exists(self._path(rel))) or bool(self.list_dir(rel))

    def publish_tree(self, source: Path, rel: str, extra: dict[str, bytes], make_manifest: Callable[[Records], bytes],
                     *, expected: dict[str, dict[str, Any]] | None = None) -> bool:
        def record(rel_path: Path) -> dict[str, Any]:
            # Hashed here, from the very file the upload then reads (an immutable cache entry,
            # checked against its record right before), not taken from the cache's record.
            path = Path(source) / rel_path
            return check_expected({"path": rel_path.as_posix(), "size": path.stat().st_size,
                                   "sha256": sha256_file(path)}, expected)

        manifest_path = f"{self._path(rel)}/{MANIFEST}"
        with self._errors("a lookup"):
            if self.fs.exists(manifest_path):
                return False  # a concurrent publisher of the same build finished first
        rels = [r for r in list_tree(Path(source)) if r.as_posix() not in extra]
        records = parallel_map(record, rels) + [
            {"path": name, "size": len(data), "sha256": digest_bytes(data)} for name, data in extra.items()]
        manifest = make_manifest(sorted(records, key=lambda r: r["path"]))
        local = [Path(source) / p for p in rels]
        remote = [f"{self._path(rel)}/{p.as_posix()}" for p in rels]
        # Nothing is deleted on failure: a concurrent publisher of the same version may be
        # uploading the same keys, and a version without a manifest is invisible anyway (gc
        # removes such leftovers after its grace period; a rerun overwrites them).
        with self._errors("an upload"):
            if local:
                self._upload(local, [r.split("/", 1)[1] for r in remote])
            for name, data in extra.items():
                self.fs.pipe_file(f"{self._path(rel)}/{name}", data)
        # Every object must be there with its size before the manifest vouches for it (a gc of
        # leftovers, or another publisher's failure, must not leave a manifest over holes).
        stored = dict(self.list_files(rel))
        short = [r["path"] for r in records if stored.get(r["path"]) != r["size"]]
        if short:
            raise StorageError(f"{len(short)} uploaded file(s) of {self._path(rel)} are missing or short: "
                               f"{', '.join(short[:3])}", where="publish", fix="rerun to publish again")
        # Last, and only if no manifest is there yet: the version now exists, exactly once.
        return self.write_if(f"{rel}/{MANIFEST}", manifest, None)

    def _upload(self, files: list[Path], keys: list[str]) -> None:
        """Concurrent multipart uploads of many files through one transfer manager."""
        import boto3
        from boto3.s3.transfer import TransferConfig, create_transfer_manager
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3", **self._client_kwargs, config=Config(retries={"max_attempts": _RETRIES, "mode": "standard"}))
        config = TransferConfig(multipart_chunksize=8 << 20, max_concurrency=10)
        with create_transfer_manager(client, config) as manager:
            futures = [manager.upload(str(f), self.bucket, key) for f, key in zip(files, keys)]
            for future in futures:
                future.result()

    def download(self, rel: str, target: Path) -> str | None:
        with self._errors("a download"):
            self.fs.get_file(self._path(rel), str(target))
        return None

    def delete_tree(self, rel: str) -> None:
        with self._errors("a delete"):
            keys = [f"{self._path(rel)}/{p}" for p, _size in self.list_files(rel)]
            if self.fs.exists(self._path(rel)) and not keys:
                keys = [self._path(rel)]
            if keys:
                self.fs.rm(keys)

    def unfinished_uploads(self, rel: str) -> list[tuple[str, str, float]]:
        """Multipart uploads a SIGKILLed publisher left open: S3 keeps (and bills) their parts
        until they are aborted, and no listing of objects shows them."""
        from fsspec.asyn import sync

        prefix = self._key(rel).rstrip("/") + "/" if self._key(rel) else ""
        base = self.prefix.rstrip("/") + "/" if self.prefix else ""

        async def pending() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            marker: dict[str, str] = {}
            while True:
                page = await self.fs._call_s3("list_multipart_uploads", Bucket=self.bucket, Prefix=prefix, **marker)
                out += page.get("Uploads", [])
                if not page.get("IsTruncated"):
                    return out
                marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

        with self._errors("listing unfinished uploads"):
            return [(u["Key"].removeprefix(base), u["UploadId"], u["Initiated"].timestamp())
                    for u in sync(self.fs.loop, pending)]

    def abort_upload(self, rel: str, upload_id: str) -> None:
        from fsspec.asyn import sync

        with self._errors("aborting an unfinished upload"):
            sync(self.fs.loop, self.fs._call_s3, "abort_multipart_upload", Bucket=self.bucket, Key=self._key(rel),
                 UploadId=upload_id)

    def modified(self, rel: str) -> float | None:
        base = self._path(rel) + "/"
        with self._errors("a listing"):
            found = self.fs.find(base, detail=True)
        stamps = [info["LastModified"].timestamp() for info in found.values() if info.get("LastModified")]
        return max(stamps) if stamps else None

    def incomplete_versions(self, rel: str) -> list[str]:
        out = []
        for name in self.list_dir(rel):
            # Dot-names are the variant's own bookkeeping (the claims of version names), not versions.
            if name != "channels" and not name.startswith(".") and not self.fs.exists(f"{self._path(rel)}/{name}/{MANIFEST}"):
                out.append(name)
        return out
