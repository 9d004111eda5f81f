"""Publish and pull throughput of a multi-GB variant against the tools a user would run by hand.

Side by side in one run, alternating which goes first:

- filesystem: ``modelbuild`` publish (a copy, hashed as it is written) vs ``cp -r`` of the
  same folder into the same store; ``modelbuild pull`` vs ``cp -r`` out of the store.
- S3: a moto S3 server on loopback; publish vs ``aws s3 cp --recursive`` up, pull vs
  ``aws s3 cp --recursive`` down. The AWS CLI goes into its own virtual environment (it pins
  botocore exactly) under ``--work``.

modelbuild publishes from a stage-cache entry, as its publish stage does, and does more than the
copy both ways: every published file is hashed as it is written (the manifest records the bytes
written, checked against the cache entry's record; on S3 each file is hashed before its upload),
and every pulled file's sha256 is checked before the folder is moved into place. Ratios are tool time / modelbuild time (≥ 1: modelbuild is as fast); target ≥ 0.9.

    python benchmarks/storage_throughput.py --gb 2 --work /tmp/storage-bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO

sys.path.insert(0, str(REPO))


def _variant(folder: Path, gb: float, shards: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    size = int(gb * 1e9 / shards)
    for i in range(shards):
        path = folder / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                left = size
                while left:
                    n = min(left, 64 << 20)
                    f.write(os.urandom(n))
                    left -= n
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def _timed(fn) -> float:
    subprocess.run(["sync"], check=False)
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _manifest() -> dict:
    return {"format": {"format": "compressed-tensors", "scheme": "FP8", "engines": ["vllm"],
                       "min_compute_capability": 8.9, "serve": {}},
            "metrics": {}, "gate": {"passed": True}, "size_bytes": 0, "source": {"kind": "local"}}


def _cache_entry(src: Path, work: Path):
    """The variant as a stage-cache entry (what the publish stage publishes from)."""
    from pipeline.cache.store import CacheStore

    store = CacheStore(work / "cache")
    key = "c" * 64
    return store.get(key) or store.put(key, lambda out: [shutil.copyfile(p, out / p.name) for p in src.iterdir()]
                                        and {}, {"stage": "bench"})


def _publish(url: str, entry, key: str) -> None:
    from pipeline.storage.location import open_storage
    from pipeline.storage.publish import publish_variant

    publish_variant(open_storage(url), model="bench", variant="v", build_key=key * 64, files_from=entry.data,
                    manifest=_manifest(), expected=entry.record["files"])


def _pull(url: str, dest: Path) -> None:
    from pipeline.storage.consume import pull
    from pipeline.storage.location import open_storage
    from pipeline.storage.refs import Ref

    pull(open_storage(url), Ref("bench", "v", "latest"), dest)


def _rm(path: Path) -> None:
    if path.exists():
        for p in path.rglob("*"):
            if p.is_file():
                os.chmod(p, 0o644)
        shutil.rmtree(path)


def bench_filesystem(src: Path, work: Path, repeat: int) -> dict:
    entry = _cache_entry(src, work)
    store, scratch = work / "fs-store", work / "fs-scratch"
    rows: dict[str, list[float]] = {"publish": [], "cp_up": [], "cp_sha": [], "pull": [], "cp_down": []}
    for i in range(repeat):
        _rm(store)
        _rm(scratch)
        scratch.mkdir(parents=True)
        order = [("publish", lambda: _publish(str(store), entry, "abcdef"[i % 6])),
                 ("cp_up", lambda: subprocess.run(["cp", "-r", str(entry.data), str(scratch / "up")], check=True)),
                 # The same guarantee by hand: the copy, then the digests a manifest needs.
                 ("cp_sha", lambda: subprocess.run(f"cp -r {entry.data} {scratch / 'up2'} && "
                                                   f"find {scratch / 'up2'} -type f -print0 | xargs -0 -P2 -n2 sha256sum",
                                                   shell=True, check=True, stdout=subprocess.DEVNULL))]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            rows[name].append(_timed(fn))
        from pipeline.storage.location import open_storage
        from pipeline.storage.registry import versions

        version = versions(open_storage(str(store)), "bench", "v")[-1]
        order = [("pull", lambda: _pull(str(store), scratch / "pulled")),
                 ("cp_down", lambda: subprocess.run(["cp", "-r", str(store / "bench" / "v" / version),
                                                     str(scratch / "down")], check=True))]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            rows[name].append(_timed(fn))
    _rm(store)
    _rm(scratch)
    return {k: statistics.median(v) for k, v in rows.items()}


def _aws_cli(work: Path) -> Path:
    venv = work / "awscli-venv"
    aws = venv / "bin" / "aws"
    if not aws.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "awscli"], check=True)
    return aws


def bench_s3(src: Path, work: Path, repeat: int) -> dict:
    import boto3

    entry = _cache_entry(src, work)

    aws = _aws_cli(work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_ENDPOINT_URL=endpoint,
                      AWS_REGION="us-east-1")
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        rows: dict[str, list[float]] = {"publish": [], "aws_up": [], "pull": [], "aws_down": []}
        scratch = work / "s3-scratch"
        for i in range(repeat):
            bucket = f"bench-{i}"
            client.create_bucket(Bucket=bucket)
            url = f"s3://{bucket}/store"
            _rm(scratch)
            scratch.mkdir(parents=True)
            aws_cmd = [str(aws), "--endpoint-url", endpoint, "s3", "cp", "--recursive", "--only-show-errors"]
            order = [("publish", lambda: _publish(url, entry, "a")),
                     ("aws_up", lambda: subprocess.run([*aws_cmd, str(entry.data), f"s3://{bucket}/by-hand/"], check=True))]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                rows[name].append(_timed(fn))
            from pipeline.storage.location import open_storage
            from pipeline.storage.registry import versions

            version = versions(open_storage(url), "bench", "v")[-1]
            order = [("pull", lambda: _pull(url, scratch / "pulled")),
                     ("aws_down", lambda: subprocess.run([*aws_cmd, f"{url}/bench/v/{version}/", str(scratch / "down")],
                                                         check=True))]
            for name, fn in order if i % 2 == 0 else order[::-1]:
                rows[name].append(_timed(fn))
            _rm(scratch)
        return {k: statistics.median(v) for k, v in rows.items()}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="variant size in GB (4 shards of random bytes)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/storage-bench"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("fs", "s3"), default=None)
    args = parser.parse_args()
    src = _variant(args.work / "variant", args.gb)
    gb = sum(p.stat().st_size for p in src.iterdir()) / 1e9
    print(f"variant: {gb:.2f} GB in {len(list(src.iterdir()))} files; medians of {args.repeat}, alternating order")
    def report(label: str, ours: float, tool: str, theirs: float) -> None:
        print(f"{label:<20} modelbuild {ours:.2f}s ({gb / ours:.2f} GB/s), {tool} {theirs:.2f}s → ratio {theirs / ours:.2f}")

    if args.only in (None, "fs"):
        fs = bench_filesystem(src, args.work, args.repeat)
        report("filesystem publish:", fs["publish"], "cp -r", fs["cp_up"])
        report("filesystem publish:", fs["publish"], "cp -r + sha256sum", fs["cp_sha"])
        report("filesystem pull:", fs["pull"], "cp -r", fs["cp_down"])
    if args.only in (None, "s3"):
        s3 = bench_s3(src, args.work, args.repeat)
        report("S3 publish:", s3["publish"], "aws s3 cp", s3["aws_up"])
        report("S3 pull:", s3["pull"], "aws s3 cp", s3["aws_down"])


if __name__ == "__main__":
    main()
