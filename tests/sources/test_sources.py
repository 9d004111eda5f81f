"""Sources: local folders, the Hub (offline, from a pre-populated cache), GGUF files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import SourceError
from pipeline.sources import ResolvedSource, hub, local


class _Src:
    """A stand-in for the validated source model (the sources only read attributes)."""

    def __init__(self, **kw):
        self.allow_pickle = False
        self.trust_remote_code = False
        self.__dict__.update(kw)


def _copy_model(tiny_model: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model, dest)
    return dest


def test_local_resolve_hashes_every_file(tiny_model):
    resolved = local.resolve(_Src(kind="local", path=tiny_model))
    assert "model.safetensors" in resolved.identity["files"]
    assert "config.json" in resolved.identity["files"]
    digest = hashlib.sha256((tiny_model / "model.safetensors").read_bytes()).hexdigest()
    assert resolved.identity["files"]["model.safetensors"] == digest


def test_missing_folder(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        local.resolve(_Src(kind="local", path=tmp_path / "nope"))


def test_folder_without_weights(tmp_path, tiny_model):
    model = _copy_model(tiny_model, tmp_path / "m")
    (model / "model.safetensors").unlink()
    with pytest.raises(SourceError, match="no weights"):
        local.resolve(_Src(kind="local", path=model))


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_safetensors(tmp_path, tiny_model, cut):
    model = _copy_model(tiny_model, tmp_path / "m")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(SourceError, match="truncated safetensors"):
        local.resolve(_Src(kind="local", path=model))


def test_garbage_safetensors(tmp_path, tiny_model):
    model = _copy_model(tiny_model, tmp_path / "m")
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(SourceError, match="corrupt safetensors"):
        local.resolve(_Src(kind="local", path=model))


def test_pickle_only_needs_opt_in(tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    model = _copy_model(tiny_model, tmp_path / "m")
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    with pytest.raises(SourceError, match="allow_pickle"):
        local.resolve(_Src(kind="local", path=model))
    resolved = local.resolve(_Src(kind="local", path=model, allow_pickle=True))
    assert "pytorch_model.bin" in resolved.identity["files"]


def test_remote_code_needs_opt_in(tmp_path, tiny_model):
    model = _copy_model(tiny_model, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match="trust_remote_code"):
        local.resolve(_Src(kind="local", path=model))
    local.resolve(_Src(kind="local", path=model, trust_remote_code=True))


def populate_hub_cache(cache: Path, repo: str, files_from: Path, commit: str, ref: str = "main") -> None:
    """Lay out a Hugging Face Hub cache the way huggingface_hub writes it: blobs named by their
    hash, a snapshot folder per commit holding symlinks to the blobs, refs/<branch> naming the
    commit. Extra files (a README, a pickle) show that only model files are taken. Called again
    with another commit, it moves the branch (as a new upstream release does)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)


def test_hub_offline_from_cache(tmp_path, tiny_model, monkeypatch):
    commit = "a" * 40
    cache = tmp_path / "hub"
    populate_hub_cache(cache, "acme/tiny", tiny_model, commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    src = _Src(kind="hub", repo="acme/tiny", revision="main")
    resolved = hub.resolve(src)
    assert resolved.identity["commit"] == commit
    assert "*.bin" not in resolved.identity["allow_patterns"]
    out = tmp_path / "out"
    hub.materialize(src, resolved, out)
    assert (out / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_hub_offline_missing_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE"):
        hub.resolve(_Src(kind="hub", repo="acme/absent", revision="main"))


def test_gguf_missing_package_and_bad_file(tmp_path):
    from pipeline.sources import gguf

    with pytest.raises(SourceError, match="not installed"):
        gguf.resolve(_Src(kind="gguf", path=None, package="no_such_pkg_xyz", file="m.gguf", dtype="bfloat16"))
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"NOPE" + b"\x00" * 100)
    with pytest.raises(SourceError, match="bad magic"):
        gguf.resolve(_Src(kind="gguf", path=bad, package=None, file=None, dtype="bfloat16"))
    assert isinstance(ResolvedSource("x", {}, {}), ResolvedSource)
