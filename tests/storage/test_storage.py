"""The store: versions, channels, the registry index under concurrent publishers, select, pull,
verify and gc — on a filesystem root and on a real S3-compatible server on loopback (moto's
standalone server, a separate process speaking the S3 HTTP API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, one_line


def _variant_dir(tmp_path: Path, name: str, payload: bytes = b"w" * 4096) -> Path:
    folder = tmp_path / f"src-{name}"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "sub" / "config.json").write_text('{"a": 1}')
    return folder


def _manifest(engines=("vllm",), cc=8.9, kld=0.05, size=4105) -> dict:
    return {"format": {"format": "compressed-tensors", "scheme": "FP8", "engines": list(engines),
                       "min_compute_capability": cc, "serve": {e: f"{e} serve {{path}}" for e in engines}},
            "metrics": {"mean_kld": kld, "ppl": 30.0}, "gate": {"passed": True}, "size_bytes": size,
            "source": {"kind": "local", "path": "/x"}}


def _publish(url: str, tmp_path: Path, variant: str, key: str, **manifest_kw) -> dict:
    from pipeline.storage.location import open_storage
    from pipeline.storage.publish import publish_variant

    return publish_variant(open_storage(url), model="m", variant=variant, build_key=key * 64,
                           files_from=_variant_dir(tmp_path, variant), manifest=_manifest(**manifest_kw))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


def test_publish_list_show_pull_verify_round_trip(store_url, tmp_path):
    first = _publish(store_url, tmp_path, "fp8", "a")
    again = _publish(store_url, tmp_path, "fp8", "a")
    assert first["status"] == "published" and again == {**first, "status": "already published"}
    listed = json.loads(_cli("list", "--storage", store_url, "--json").stdout)
    assert [(e["model"], e["variant"], e["version"]) for e in listed] == [("m", "fp8", first["version"])]
    assert listed[0]["engines"] == ["vllm"] and listed[0]["gpus"] == {"vllm": [8.9, None]}
    shown = json.loads(_cli("show", "m/fp8", "--storage", store_url, "--json").stdout)
    assert shown == {"versions": [first["version"]], "channels": {"latest": first["version"]}}
    manifest = json.loads(_cli("show", "m/fp8@latest", "--storage", store_url, "--json").stdout)
    assert manifest["serve"]["vllm"] == f"vllm serve {first['path']}"
    dest = tmp_path / "pulled"
    out = _cli("pull", "m/fp8", str(dest), "--storage", store_url, "--json")
    assert out.returncode == 0, out.stderr
    assert (dest / "model.safetensors").read_bytes() == b"w" * 4096 and (dest / "sub" / "config.json").is_file()
    assert not list(tmp_path.glob(".pulled.partial-*"))
    assert _cli("verify", str(dest)).returncode == 0
    checked = _cli("verify", "m/fp8", "--storage", store_url)
    assert checked.returncode == 0 and "every file matches" in checked.stdout


def test_run_publishes_the_tiny_recipe_to_s3(cli, recipe_factory, s3_endpoint, tmp_path):
    """The real pipeline's publish stage against the S3 server; a manifest-less leftover is invisible."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="pipeline-run")
    code, _out, err = cli("run", recipe_factory(), "--storage", "s3://pipeline-run/root")
    assert code == 0, err
    listed = json.loads(_cli("list", "--storage", "s3://pipeline-run/root", "--json").stdout)
    assert len(listed) == 1 and listed[0]["gate"] == {"passed": True} and listed[0]["metrics"]["mean_kld"] >= 0
    ref = f"{listed[0]['model']}/{listed[0]['variant']}"
    dest = tmp_path / "pulled"
    assert _cli("pull", ref, str(dest), "--storage", "s3://pipeline-run/root").returncode == 0
    assert _cli("verify", str(dest)).returncode == 0


def test_recipe_names_the_s3_endpoint(cli, recipe_factory, s3_endpoint, tmp_path, monkeypatch):
    """`publish.s3.endpoint_url` in the recipe reaches the store with no AWS_ENDPOINT_URL set; the
    credentials still come from the environment and appear in neither the manifest nor the index."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket="recipe-endpoint")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIARECIPEENDPOINT01")  # moto accepts any key pair
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-Zq9-never-written")
    recipe = recipe_factory()
    recipe.write_text(recipe.read_text() + f"publish:\n  root: s3://recipe-endpoint/root\n  s3: {{endpoint_url: '{s3_endpoint}'}}\n")
    code, _out, err = cli("run", recipe, "--storage", "s3://recipe-endpoint/root")
    assert code == 0, err
    objects = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").list_objects_v2(
        Bucket="recipe-endpoint")["Contents"]
    keys = [o["Key"] for o in objects]
    assert "root/index.json" in keys and any(k.endswith("/manifest.json") for k in keys)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for key in ("root/index.json", next(k for k in keys if k.endswith("/manifest.json"))):
        text = s3.get_object(Bucket="recipe-endpoint", Key=key)["Body"].read().decode()
        assert "s3cr3t-Zq9" not in text and "AKIARECIPEENDPOINT01" not in text


def test_eight_concurrent_publishers_lose_no_entry(store_url, tmp_path):
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]);"
        "from tests.storage.test_storage import _publish; _publish(sys.argv[1], Path(sys.argv[2]), sys.argv[4], sys.argv[5])"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, store_url, str(tmp_path), str(REPO), f"v{i}", "0123456789abcdef"[i]],
                              cwd=REPO, env=dict(os.environ), stderr=subprocess.PIPE, text=True) for i in range(8)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    listed = json.loads(_cli("list", "--storage", store_url, "--json").stdout)
    assert sorted(e["variant"] for e in listed) == [f"v{i}" for i in range(8)]


def test_channels_promote_rollback_and_gc(store_url, tmp_path):
    from pipeline.storage.location import open_storage
    from pipeline.storage.registry import channels, versions

    v1 = _publish(store_url, tmp_path, "q", "1")["version"]
    time.sleep(1.1)  # versions are named by the second
    v2 = _publish(store_url, tmp_path, "q", "2")["version"]
    time.sleep(1.1)
    v3 = _publish(store_url, tmp_path, "q", "3")["version"]
    assert _cli("promote", f"m/q@{v1}", "--channel", "stable", "--storage", store_url).returncode == 0
    assert _cli("promote", f"m/q@{v2}", "--channel", "stable", "--storage", store_url).returncode == 0
    assert _cli("rollback", "m/q", "--channel", "stable", "--storage", store_url).returncode == 0
    store = open_storage(store_url)
    assert channels(store, "m", "q") == {"latest": v3, "stable": v1}
    gone = _cli("gc", "--keep", "1", "--storage", store_url)
    assert gone.returncode == 0, gone.stderr
    assert versions(store, "m", "q") == [v1, v3]  # v1 stays: a channel points at it
    listed = json.loads(_cli("list", "--storage", store_url, "--json").stdout)
    assert sorted(e["version"] for e in listed) == [v1, v3]


def test_select_picks_the_best_fitting_variant_or_says_why(store_url, tmp_path):
    _publish(store_url, tmp_path, "fp8", "a", engines=("vllm",), cc=8.9, kld=0.03, size=3_000_000_000)
    _publish(store_url, tmp_path, "w4a16", "b", engines=("vllm",), cc=7.5, kld=0.15, size=1_000_000_000)
    _publish(store_url, tmp_path, "gguf-q4", "c", engines=("llamacpp",), cc=None, kld=0.2, size=900_000_000)
    pick = lambda *a: _cli("select", *a, "--storage", store_url)  # noqa: E731
    assert pick("--engine", "vllm", "--gpu", "H100").stdout.strip().endswith("/m/fp8/" + _version(store_url, "fp8"))
    assert "/m/w4a16/" in pick("--engine", "vllm", "--gpu", "A100").stdout  # FP8 needs 8.9
    assert "/m/w4a16/" in pick("--engine", "vllm", "--gpu", "H100", "--max-gb", "2").stdout
    assert "/m/gguf-q4/" in pick("--engine", "llamacpp", "--gpu", "cpu").stdout
    none = pick("--engine", "vllm", "--gpu", "H100", "--max-kld", "0.01")
    assert none.returncode == 2 and "3 variant(s) published" in none.stderr and "0 have mean KLD <= 0.01" in none.stderr
    assert pick("--engine", "vllm", "--gpu", "Z9000").returncode == 2


def _version(url: str, variant: str) -> str:
    from pipeline.storage.location import open_storage
    from pipeline.storage.registry import versions

    return versions(open_storage(url), "m", variant)[-1]


def test_pull_refuses_a_damaged_file_and_keeps_nothing(tmp_path):
    url = str(tmp_path / "store")
    out = _publish(url, tmp_path, "v", "a")
    blob = Path(out["path"]) / "model.safetensors"
    os.chmod(blob, 0o644)
    blob.write_bytes(b"x" * 4096)  # same size, other bytes
    dest = tmp_path / "dest"
    bad = _cli("pull", "m/v", str(dest), "--storage", url)
    assert bad.returncode == 5 and "do not match the manifest: model.safetensors" in bad.stderr
    assert not dest.exists() and not list(tmp_path.glob(".dest.partial-*"))


def _pull_and_hang(url: str, dest: str, marker: str) -> None:
    """A pull that downloads its first file whole, then hangs inside the second download until it
    is killed (deterministic, instead of racing a timer against the transfer)."""
    from pipeline.storage.consume import pull
    from pipeline.storage.location import open_storage
    from pipeline.storage.refs import parse_ref

    store = open_storage(url)
    download, calls = store.download, []

    def first_then_hang(rel, target):
        calls.append(rel)
        if len(calls) > 1:
            Path(target).write_bytes(b"half")  # a transfer cut short
            Path(marker).touch()
            time.sleep(3600)
        return download(rel, target)

    store.download = first_then_hang
    pull(store, parse_ref("m/big"), Path(dest), jobs=1)


def test_pull_killed_midway_resumes_on_the_rerun(store_url, tmp_path):
    from pipeline.storage.location import open_storage
    from pipeline.storage.publish import publish_variant

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"shard-{i}.bin").write_bytes(os.urandom(200_000))
    publish_variant(open_storage(store_url), model="m", variant="big", build_key="c" * 64, files_from=src,
                    manifest=_manifest())
    dest, marker = tmp_path / "dest", tmp_path / "hanging"
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.storage.test_storage import _pull_and_hang;"
              "_pull_and_hang(*sys.argv[2:])")
    proc = subprocess.Popen([sys.executable, "-c", script, str(REPO), store_url, str(dest), str(marker)], cwd=REPO,
                            env=dict(os.environ), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    partial = next(tmp_path.glob(".dest.partial-*"))
    complete = [p.name for p in partial.iterdir() if p.name.startswith("shard-")]
    assert len(complete) == 1 and not dest.exists()  # one whole file, the cut one under a temporary name
    again = _cli("pull", "m/big", str(dest), "--storage", store_url, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "pulled"
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "shard-0.bin", "shard-1.bin", "shard-2.bin"]
    assert all((dest / n).read_bytes() == (src / n).read_bytes() for n in ("shard-0.bin", "shard-1.bin", "shard-2.bin"))
    assert _cli("verify", str(dest)).returncode == 0 and not list(tmp_path.glob(".dest.partial-*"))


def test_pull_resumes_an_interrupted_download(tmp_path):
    url = str(tmp_path / "store")
    version = _publish(url, tmp_path, "v", "a")["version"]
    partial = tmp_path / f".dest.partial-{version}"
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / "config.json").write_text('{"a": 1}')  # finished before the interruption
    (partial / "model.safetensors").write_bytes(b"w" * 100)  # cut short
    assert _cli("pull", "m/v", str(tmp_path / "dest"), "--storage", url).returncode == 0
    assert (tmp_path / "dest" / "model.safetensors").read_bytes() == b"w" * 4096 and not partial.exists()


def test_manifest_that_does_not_match_its_index_entry(store_url, tmp_path):
    from pipeline.storage.location import open_storage

    version = _publish(store_url, tmp_path, "v", "a")["version"]
    store, rel = open_storage(store_url), f"m/v/{version}/manifest.json"
    if store.local_path(rel) is not None:
        os.chmod(store.local_path(rel), 0o644)  # published files are read-only
    store.write_bytes(rel, store.read_bytes(rel).replace(b'"ppl": 30.0', b'"ppl": 1.0'))
    bad = _cli("pull", "m/v", str(tmp_path / "dest"), "--storage", store_url)
    assert bad.returncode == 5 and "does not match its registry entry" in one_line(bad.stderr)
    assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".dest.partial-*"))


def test_channel_pointing_at_a_deleted_version(store_url, tmp_path):
    from pipeline.storage.location import open_storage

    version = _publish(store_url, tmp_path, "v", "a")["version"]
    time.sleep(1.1)
    _publish(store_url, tmp_path, "v", "b")
    assert _cli("promote", f"m/v@{version}", "--channel", "stable", "--storage", store_url).returncode == 0
    open_storage(store_url).delete_tree(f"m/v/{version}")
    bad = _cli("pull", "m/v@stable", str(tmp_path / "d"), "--storage", store_url)
    assert bad.returncode == 2 and f"points at version {version}, which no longer exists" in one_line(bad.stderr)


@pytest.mark.parametrize("args, message", [
    (("show", "../etc/v"), "invalid model name '..'"),
    (("show", "m/..@x"), "invalid variant name '..'"),
    (("pull", "m/v/../../x", "/tmp/never"), "invalid variant name"),
    (("show", "m/nope"), "nothing published as m/nope"),
    (("show", "m/nope"), "pick one of the variants of m: v"),
    (("pull", "nope/v", "/tmp/never"), "pick one of the models: m"),
    (("pull", "m/v@nope", "/tmp/never"), "channels: latest; versions: "),
    (("select", "--model", "nope", "--engine", "vllm", "--gpu", "H100"), "pick one of the models: m"),
    (("list", "--storage", "gs://bucket/x"), "unknown storage scheme 'gs'"),
])
def test_bad_references_and_schemes(args, message, tmp_path):
    _publish(str(tmp_path / "store"), tmp_path, "v", "a")
    argv = list(args) if "--storage" in args else [*args, "--storage", str(tmp_path / "store")]
    bad = _cli(*argv)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_missing_bucket_is_one_clear_line(s3_endpoint, cli, recipe_factory):
    code, _out, err = cli("run", recipe_factory(), "--storage", "s3://no-such-bucket/x")
    line = one_line(err)
    assert code == 2 and "bucket 'no-such-bucket' does not exist" in line and "aws s3 mb" in line
    bad = _cli("list", "--storage", "s3://no-such-bucket/x")
    assert bad.returncode == 2 and "bucket 'no-such-bucket' does not exist" in one_line(bad.stderr)


def _publish_big(url: str, tmp: str, files: int, size: int, hold: bool = False) -> None:
    """A publisher of many independent copies. With ``hold`` it stops at its commit point (every data
    file written, the manifest not yet) and waits there to be killed: the worst moment to die, made
    deterministic instead of racing a poll against the upload."""
    from pipeline.storage.location import open_storage
    from pipeline.storage.publish import publish_variant

    src = Path(tmp) / "big"
    src.mkdir(exist_ok=True)
    for i in range(files):
        (src / f"shard-{i:03d}.bin").write_bytes(os.urandom(size))
    store = open_storage(url)
    if hold:
        def wait_here() -> None:
            (Path(tmp) / "at-commit-point").touch()
            time.sleep(3600)

        if store.local_path("") is None:  # S3: the manifest is the last object put (conditionally)
            put = store.write_if
            store.write_if = lambda rel, data, token: (wait_here() if rel.endswith("/manifest.json")
                                                       else put(rel, data, token))
        else:  # filesystem: the manifest is written into the staging folder before its rename
            from pipeline.storage import local

            write = local.atomic_write
            local.atomic_write = lambda path, data: wait_here() if path.name == "manifest.json" else write(path, data)
    publish_variant(store, model="m", variant="big", build_key="b" * 64, files_from=src, manifest=_manifest())


def test_publisher_killed_at_its_commit_point_leaves_nothing_visible(store_url, tmp_path):
    """SIGKILL with every file up but no manifest yet: no version, no index entry, no channel; the
    rerun publishes it whole (under the version name the killed publisher claimed) and gc clears
    any leftover."""
    from pipeline.storage.location import open_storage
    from pipeline.storage.registry import channels, versions

    store = open_storage(store_url)
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.storage.test_storage import _publish_big;"
              "_publish_big(sys.argv[2], sys.argv[3], 48, 2_000_000, hold=True)")
    log = tmp_path / "publisher.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", script, str(REPO), store_url, str(tmp_path)], cwd=REPO,
                                env=dict(os.environ), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while not (tmp_path / "at-commit-point").exists():
        assert proc.poll() is None, f"publisher ended before its commit point: {log.read_text()[-2000:]}"
        assert time.time() < deadline, "publisher never reached its commit point"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    leftovers = store.incomplete_versions("m/big")
    assert leftovers and versions(store, "m", "big") == [] and channels(store, "m", "big") == {}
    assert json.loads(_cli("list", "--storage", store_url, "--json").stdout) == []
    assert "nothing published as m/big" in _cli("pull", "m/big", str(tmp_path / "d"), "--storage", store_url).stderr
    _publish_big(store_url, str(tmp_path), 48, 2_000_000)
    [version] = versions(store, "m", "big")
    assert _cli("verify", "m/big", "--storage", store_url).returncode == 0
    from pipeline.storage.consume import gc

    # S3 completes the claimed version in place (its leftover *is* the version); a filesystem
    # leaves a staging folder that gc clears.
    assert set(gc(store, keep=1, grace_s=-1)) == {f"m/big/{n}" for n in leftovers if n != version}
    assert store.incomplete_versions("m/big") == [] and versions(store, "m", "big") == [version]


def test_gc_aborts_unfinished_multipart_uploads_past_the_grace(s3_store, s3_endpoint, tmp_path):
    """A publisher killed inside a multipart upload leaves parts that no object listing shows but S3
    keeps (and bills); gc aborts them once older than the grace period, never a young one."""
    import boto3

    _publish(s3_store, tmp_path, "v", "a")
    bucket, prefix = s3_store[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    old, young = (f"{prefix}/m/v/{stamp}-{'d' * 12}/model.safetensors"
                  for stamp in ("20260101T000000Z", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())))
    for key in (old, young):
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        s3.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * (5 << 20))

    def pending() -> list[str]:
        return sorted(u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))

    seen = _cli("gc", "--keep", "1", "--dry-run", "--storage", s3_store)  # default grace: an hour
    assert seen.returncode == 0 and seen.stdout.count("(unfinished upload)") == 1, seen.stdout
    assert f"would delete {old.split('/', 1)[1]} (unfinished upload)" in seen.stdout and pending() == sorted([old, young])
    done = _cli("gc", "--keep", "1", "--storage", s3_store)
    assert done.returncode == 0 and done.stdout.count("(unfinished upload)") == 1 and pending() == [young]
    assert _cli("gc", "--keep", "1", "--grace-minutes", "0", "--storage", s3_store).returncode == 0
    assert pending() == []
    assert [e["variant"] for e in json.loads(_cli("list", "--storage", s3_store, "--json").stdout)] == ["v"]


def test_bad_credentials_are_one_clear_line(tmp_path):
    """A second S3 server that authenticates every request: unknown keys are refused by name."""
    from tests.conftest import _free_port, wait_for_port

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIANOTAREALKEY0000",
               "AWS_SECRET_ACCESS_KEY": "wrong"}
        bad = subprocess.run([sys.executable, "-m", "pipeline", "list", "--storage", "s3://any-bucket/x"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "S3 refused" in bad.stderr and "AWS_ACCESS_KEY_ID" in bad.stderr, bad.stderr
        assert "wrong" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)



class _FlakyProxy:
    """A TCP proxy in front of the S3 server that answers its first ``failures`` connections with
    HTTP 503 (what S3 sends when it sheds load), then forwards bytes both ways."""

    def __init__(self, upstream_port: int, failures: int):
        import socket
        import threading

        self.upstream, self.failures, self.connections = upstream_port, failures, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.connections <= self.failures:
                client.recv(65536)
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("failures, ok", [(2, True), (1000, False)])
def test_transient_errors_are_retried_then_reported(s3_store, s3_endpoint, tmp_path, failures, ok):
    """503s are retried with backoff (botocore's standard mode) and the publish goes through;
    an endpoint that keeps failing is one clear line after the retries, nothing published."""
    proxy = _FlakyProxy(int(s3_endpoint.rsplit(":", 1)[1]), failures)
    script = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
              "from tests.storage.test_storage import _publish; _publish(sys.argv[2], Path(sys.argv[3]), 'v', 'a')")
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        done = subprocess.run([sys.executable, "-c", script, str(REPO), s3_store, str(tmp_path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        proxy.close()
    assert proxy.connections > min(failures, 5)
    if ok:
        assert done.returncode == 0, done.stderr[-2000:]
        assert [e["variant"] for e in json.loads(_cli("list", "--storage", s3_store, "--json").stdout)] == ["v"]
    else:
        assert "StorageError" in done.stderr and "after 5 attempts" in done.stderr and "503" in done.stderr
        assert json.loads(_cli("list", "--storage", s3_store, "--json").stdout) == []


@pytest.mark.parametrize("failures, ok", [(2, True), (1000, False)])
def test_consumers_retry_transient_errors_then_reportone_line(s3_store, s3_endpoint, tmp_path, failures, ok):
    """The reading side through the same flaky endpoint: pull goes through after 503s; a store that
    keeps failing is one line from the CLI, and nothing is left in the destination."""
    _publish(s3_store, tmp_path, "v", "a")
    proxy = _FlakyProxy(int(s3_endpoint.rsplit(":", 1)[1]), failures)
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        done = subprocess.run([sys.executable, "-m", "pipeline", "pull", "m/v", str(tmp_path / "dest"), "--storage",
                               s3_store], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        proxy.close()
    assert proxy.connections > min(failures, 5)
    if ok:
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / "dest" / "model.safetensors").read_bytes() == b"w" * 4096
    else:
        line = one_line(done.stderr)
        assert done.returncode == 2 and "after 5 attempts" in line and "503" in line, done.stderr
        assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".dest.partial-*"))


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hub is unreachable"),
])
def test_push_hub_says_why_it_cannot_upload(tmp_path, env, message):
    _publish(str(tmp_path / "store"), tmp_path, "v", "a")
    bad = subprocess.run([sys.executable, "-m", "pipeline", "push-hub", "m/v", "org/repo", "--storage",
                          str(tmp_path / "store")], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_push_hub_refuses_a_damaged_version(tmp_path):
    out = _publish(str(tmp_path / "store"), tmp_path, "v", "a")
    blob = Path(out["path"]) / "model.safetensors"
    os.chmod(blob, 0o644)
    blob.write_bytes(b"x" * 4096)
    bad = _cli("push-hub", "m/v", "org/repo", "--storage", str(tmp_path / "store"))
    assert bad.returncode == 5 and "not uploaded" in bad.stderr


def test_pull_refuses_a_manifest_path_outside_the_destination(tmp_path):
    url = str(tmp_path / "store")
    out = _publish(url, tmp_path, "v", "a")
    manifest = Path(out["path"]) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"][0]["path"] = "../../escaped.bin"
    manifest.write_text(json.dumps(data))
    from pipeline.storage.location import open_storage
    from pipeline.storage.registry import reindex

    reindex(open_storage(url), lambda *_version: [])  # so the index agrees; only the path check can refuse it
    bad = _cli("pull", "m/v", str(tmp_path / "dest"), "--storage", url)
    assert bad.returncode == 5 and "unsafe path '../../escaped.bin'" in bad.stderr
    assert not (tmp_path / "escaped.bin").exists()
