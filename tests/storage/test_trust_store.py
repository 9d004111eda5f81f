"""What a store vouches for never drifts: published bytes are copies hashed as written, a damaged
cache entry is rebuilt rather than republished, `verify`/`pull`/`reindex` share one checker,
anything unreadable stops gc/promote/rollback/select (exit 5), concurrent runs of one recipe make
one version, and credentials never reach any output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, one_line


def _versions(storage: Path, variant: str = "fp8") -> list[Path]:
    return sorted(p.parent for p in storage.glob(f"*/{variant}/*/manifest.json"))


def _writable(path: Path) -> Path:
    os.chmod(path, 0o644)  # published files are read-only; a careless operator is root anyway
    return path


def _damage(path: Path) -> None:
    """8 bytes overwritten in place: same size, same name, other content."""
    with open(_writable(path), "r+b") as f:
        f.seek(100)
        f.write(b"\xde\xad\xbe\xef" * 2)


def test_a_damaged_published_file_is_never_republished(cli, recipe_factory, dirs):
    assert cli("run", recipe_factory())[0] == 0
    [first] = _versions(dirs["storage"])
    published = first / "model.safetensors"
    inodes = {p.stat().st_ino for p in (dirs["cache"] / "objects").rglob("*") if p.is_file()}
    assert published.stat().st_ino not in inodes  # a copy: no write through the store reaches the cache
    _damage(published)
    # A changed gate re-gates and republishes from the cache: the new version has the built bytes.
    code, _out, err = cli("run", recipe_factory(gate="max_kld: 2.0"))
    assert code == 0, err
    second = next(v for v in _versions(dirs["storage"]) if v != first)
    assert cli("verify", second)[0] == 0
    assert cli("verify", first)[0] == 5
    manifest = json.loads((second / "manifest.json").read_text())
    record = next(f for f in manifest["files"] if f["path"] == "model.safetensors")
    import hashlib

    assert hashlib.sha256((second / "model.safetensors").read_bytes()).hexdigest() == record["sha256"]


def test_a_damaged_cache_entry_is_rebuilt_before_it_is_published(cli, recipe_factory, dirs):
    assert cli("run", recipe_factory())[0] == 0
    [cached] = [p for p in (dirs["cache"] / "objects").rglob("model.safetensors")
                if json.loads((p.parents[1] / "entry.json").read_text())["describe"]["stage"].startswith("quantize/")]
    before = cached.read_bytes()
    _damage(cached)
    code, _out, err = cli("run", recipe_factory(gate="max_kld: 2.0"))
    assert code == 0, err
    assert "is damaged" in err and "content changed" in err
    assert cached.read_bytes() == before  # rebuilt (deterministic), not trusted
    for version in _versions(dirs["storage"]):
        assert cli("verify", version)[0] == 0


def test_publish_refuses_bytes_that_differ_from_the_cache_record(tmp_path):
    from pipeline.errors import IntegrityError
    from pipeline.hashing import file_records
    from pipeline.storage.local import LocalStorage
    from pipeline.storage.publish import publish_variant

    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"w" * 64)
    expected = file_records(src)
    (src / "w.bin").write_bytes(b"x" * 64)  # changed after the cache recorded it
    store = LocalStorage(tmp_path / "store")
    with pytest.raises(IntegrityError, match="changed in the stage cache"):
        publish_variant(store, model="m", variant="v", build_key="k" * 64, files_from=src,
                        manifest={"format": {"serve": {}}}, expected=expected)
    assert not list((tmp_path / "store").glob("m/v/2*"))  # nothing published, nothing staged left


def _publish(url: str, tmp_path: Path, key: str) -> str:
    from pipeline.storage.location import open_storage
    from pipeline.storage.publish import publish_variant

    src = tmp_path / f"src-{key}"
    src.mkdir(exist_ok=True)
    (src / "w.bin").write_bytes(key.encode() * 100)
    manifest = {"format": {"format": "gguf", "engines": ["llama.cpp"], "serve": {}}, "gate": {"passed": True},
                "metrics": {"mean_kld": 0.1}}
    return publish_variant(open_storage(url), model="m", variant="v", build_key=key * 64, files_from=src,
                           manifest=manifest)["version"]


def _store_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_gc_never_deletes_what_an_unreadable_channel_might_name(tmp_path):
    url = str(tmp_path / "store")
    old, new = _publish(url, tmp_path, "a"), _publish(url, tmp_path, "b")
    assert _store_cli("promote", f"m/v@{old}", "--channel", "stable", "--storage", url).returncode == 0
    channel = Path(url) / "m" / "v" / "channels" / "stable.json"
    channel.write_bytes(channel.read_bytes()[:40])
    for args in (["gc", "--keep", "1"], ["promote", f"m/v@{new}", "--channel", "stable"],
                 ["rollback", "m/v", "--channel", "stable"], ["show", "m/v"]):
        bad = _store_cli(*args, "--storage", url)
        assert bad.returncode == 5 and "stable.json is malformed" in one_line(bad.stderr), (args, bad.stderr)
    assert (Path(url) / "m" / "v" / old / "manifest.json").is_file()
    assert channel.read_bytes().startswith(b"{")  # left as it was: nothing rewrote it


def test_gc_keeps_every_version_in_a_channels_history(tmp_path):
    url = str(tmp_path / "store")
    first = _publish(url, tmp_path, "a")
    assert _store_cli("promote", f"m/v@{first}", "--channel", "stable", "--storage", url).returncode == 0
    second = _publish(url, tmp_path, "b")
    assert _store_cli("promote", f"m/v@{second}", "--channel", "stable", "--storage", url).returncode == 0
    third = _publish(url, tmp_path, "c")
    done = _store_cli("gc", "--keep", "1", "--storage", url)
    assert done.returncode == 0, done.stderr
    left = sorted(p.name for p in (Path(url) / "m" / "v").iterdir() if (p / "manifest.json").is_file())
    assert left == sorted([first, second, third])  # first: stable's rollback target
    assert _store_cli("rollback", "m/v", "--channel", "stable", "--storage", url).returncode == 0


@pytest.mark.parametrize("store_file, content", [
    ("index.json", b'{"format": 1, "entries": [{"model": "m"}]}'),
    ("index.json", b"[]"),
    ("index.json", b'{"format": 1, "entries": [{"model": "m", "variant": "v", "version": "x", "engines": 3}]}'),
])
def test_a_malformed_index_stops_readers_with_one_line(tmp_path, store_file, content):
    url = str(tmp_path / "store")
    _publish(url, tmp_path, "a")
    (Path(url) / store_file).write_bytes(content)
    for args in (["list"], ["select", "--engine", "llamacpp", "--gpu", "cpu"]):
        bad = _store_cli(*args, "--storage", url)
        assert bad.returncode == 5 and "index.json is malformed" in one_line(bad.stderr), bad.stderr
    fixed = _store_cli("reindex", "--storage", url)
    assert fixed.returncode == 0, fixed.stderr
    assert _store_cli("list", "--storage", url).returncode == 0


def test_verify_refuses_what_pull_refuses_and_reindex_leaves_it_out(tmp_path):
    url = str(tmp_path / "store")
    version = _publish(url, tmp_path, "a")
    manifest_path = _writable(Path(url) / "m" / "v" / version / "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    hostname = Path("/etc/hostname")
    import hashlib

    manifest["files"].append({"path": "../../../../etc/hostname", "size": hostname.stat().st_size,
                              "sha256": hashlib.sha256(hostname.read_bytes()).hexdigest()})
    manifest_path.write_text(json.dumps(manifest))
    for args in (["verify", "m/v"], ["pull", "m/v", str(tmp_path / "dest")]):
        bad = _store_cli(*args, "--storage", url)
        assert bad.returncode == 5 and "unsafe path '../../../../etc/hostname'" in one_line(bad.stderr), bad.stderr
    redone = _store_cli("reindex", "--storage", url)
    assert redone.returncode == 5 and f"not indexed: m/v@{version}" in redone.stderr
    assert len(redone.stderr.strip().splitlines()) == 2  # the version left out, then the one error line
    assert json.loads(_store_cli("list", "--json", "--storage", url).stdout) == []


def test_verify_checks_the_manifest_against_the_index(tmp_path):
    url = str(tmp_path / "store")
    version = _publish(url, tmp_path, "a")
    path = _writable(Path(url) / "m" / "v" / version / "manifest.json")
    path.write_bytes(path.read_bytes().replace(b'"mean_kld": 0.1', b'"mean_kld": 0.01'))
    bad = _store_cli("verify", "m/v", "--storage", url)
    assert bad.returncode == 5 and "does not match its registry entry" in bad.stderr


def test_concurrent_publishers_of_one_build_make_one_version(tmp_path):
    """The loser of the race sees the winner's version and says so, whatever the interleaving."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.storage.location import open_storage
    from pipeline.storage.publish import publish_variant

    url = str(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(os.urandom(1 << 20))

    def publish(_i: int) -> dict:
        return publish_variant(open_storage(url), model="m", variant="v", build_key="f" * 64, files_from=src,
                               manifest={"format": {"serve": {}}})

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(publish, range(6)))
    assert len({r["version"] for r in results}) == 1
    assert sorted(r["status"] for r in results).count("published") == 1
    assert _versions_of(url) == [results[0]["version"]]


def _versions_of(url: str) -> list[str]:
    from pipeline.storage.location import open_storage
    from pipeline.storage.registry import versions

    return versions(open_storage(url), "m", "v")


def test_four_concurrent_runs_of_one_recipe_all_succeed(recipe_factory, dirs, tmp_path):
    recipe = recipe_factory()
    argv = [sys.executable, "-m", "pipeline", "run", str(recipe), "--cache-dir", str(dirs["cache"]),
            "--storage", str(dirs["storage"])]
    for round_ in range(2):  # a cold cache, then a warm one
        logs = [(tmp_path / f"out-{round_}-{i}", tmp_path / f"err-{round_}-{i}") for i in range(4)]
        procs = [subprocess.Popen([*argv, "--report-dir", str(tmp_path / f"r{round_}-{i}")], cwd=REPO,
                                  stdout=open(out, "w"), stderr=open(err, "w")) for i, (out, err) in enumerate(logs)]
        outs = [(p.wait(timeout=900), out.read_text(), err.read_text()) for p, (out, err) in zip(procs, logs)]
        for code, _out, err in outs:
            assert code == 0, err[-3000:]
        assert len(_versions(dirs["storage"])) == 1
        statuses = [line for _code, out, _err in outs for line in out.splitlines() if line.startswith("fp8: ")]
        assert len(statuses) == 4 and all("published" in s for s in statuses)
    assert _store_cli("verify", "tiny/fp8", "--storage", str(dirs["storage"])).returncode == 0


def test_credentials_in_an_endpoint_url_never_reach_any_output(cli, recipe_factory, dirs, tmp_path, monkeypatch):
    secret = "pw-d0-not-print-me"
    token = "hf_" + "x7" * 12
    monkeypatch.setenv("HF_TOKEN", token)
    recipe = recipe_factory(extra=f"publish:\n  root: s3://bucket/x\n  s3:\n    endpoint_url: http://user:{secret}@127.0.0.1:9\n")
    report_dir = tmp_path / "reports"
    code, out, err = cli("run", recipe, "--storage", "s3://bucket/x", "--report-dir", report_dir)
    assert code == 2 and "carries credentials" in one_line(err)
    written = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file() and p != recipe]
    assert (report_dir / "summary.json").is_file()
    for text in [out, err, *written]:
        assert secret not in text and token not in text


def test_messages_never_show_secret_environment_values(monkeypatch):
    from pipeline.errors import StorageError

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-123")
    text = StorageError("refused with s3cr3t-value-123 at https://me:pw@host/x").render()
    assert "s3cr3t-value-123" not in text and "pw@" not in text and "https://***@host/x" in text


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"files": [{"path": "w.bin"}]}', b'{"files": "x"}'])
def test_a_malformed_manifest_is_one_line_and_reindex_reports_it(tmp_path, content):
    url = str(tmp_path / "store")
    version = _publish(url, tmp_path, "a")
    _writable(Path(url) / "m" / "v" / version / "manifest.json").write_bytes(content)
    for args in (["verify", "m/v"], ["pull", "m/v", str(tmp_path / "dest")], ["show", f"m/v@{version}"]):
        bad = _store_cli(*args, "--storage", url)
        assert bad.returncode == 5 and f"manifest of m/v@{version}" in one_line(bad.stderr), (args, bad.stderr)
    redone = _store_cli("reindex", "--storage", url)
    assert redone.returncode == 5 and f"not indexed: m/v@{version}" in redone.stderr
    assert "Traceback" not in redone.stderr and len(redone.stderr.strip().splitlines()) == 2


def test_hard_linked_publishing_is_refused_by_the_recipe(cli, recipe_factory):
    code, _out, err = cli("validate", recipe_factory(extra="publish:\n  hardlink: true\n"))
    assert code == 2 and "hard-linked publishing was removed" in one_line(err)
    assert cli("validate", recipe_factory(extra="publish:\n  hardlink: false\n"))[0] == 0
