"""The stage cache and the keys that address it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.cache.store import CacheStore
from pipeline.hashing import digest_json
from pipeline.stages.base import Stage

KEY = "ab" + "0" * 62


def test_stage_key_is_pinned():
    """An accidental change to how keys are computed must fail loudly: every cache would be
    invalidated (or, worse, two different stages would share a key)."""
    stage = Stage(id="quantize/x", kind="quantize", params={"scheme": "FP8_DYNAMIC", "ignore": ["lm_head"]},
                  inputs=("fetch",), tools=("torch", "llmcompressor"), version=1)
    key = stage.compute_key({"fetch": "f" * 64}, {"torch": "2.13.0", "llmcompressor": "0.13.0"})
    assert key == "c79699483a0d3e2c8b5afd5f2d90004d1d25244bbb4bde6fe4e61ca58099a733"
    assert key == digest_json({
        "kind": "quantize", "version": 1, "params": {"ignore": ["lm_head"], "scheme": "FP8_DYNAMIC"},
        "tools": {"llmcompressor": "0.13.0", "torch": "2.13.0"}, "inputs": {"fetch": "f" * 64},
    })
    # Each ingredient changes the key.
    assert stage.compute_key({"fetch": "e" * 64}, {"torch": "2.13.0", "llmcompressor": "0.13.0"}) != key
    assert stage.compute_key({"fetch": "f" * 64}, {"torch": "2.14.1", "llmcompressor": "0.13.0"}) != key


def test_put_get_roundtrip(tmp_path):
    store = CacheStore(tmp_path)
    entry = store.put(KEY, lambda out: (out / "a.txt").write_text("hi") and {"n": 1}, {"stage": "t"})
    assert entry.result == {"n": 1}
    assert (entry.data / "a.txt").read_text() == "hi"
    again = store.get(KEY)
    assert again is not None and again.digest == entry.digest and len(again.digest) == 64
    assert not any((tmp_path / "tmp").iterdir())


def test_failed_build_leaves_nothing(tmp_path):
    store = CacheStore(tmp_path)

    def boom(out):
        (out / "half.bin").write_bytes(b"x" * 100)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.put(KEY, boom, {})
    assert store.get(KEY) is None
    assert not any((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize("damage", ["truncate", "delete", "entry"])
def test_damaged_entry_is_removed_with_a_warning(tmp_path, damage):
    warnings = []
    store = CacheStore(tmp_path, warn=warnings.append)
    entry = store.put(KEY, lambda out: (out / "w.bin").write_bytes(b"x" * 1000) and {}, {})
    if damage == "truncate":
        (entry.data / "w.bin").write_bytes(b"x" * 10)
    elif damage == "delete":
        (entry.data / "w.bin").unlink()
    else:
        (entry.data.parent / "entry.json").write_text("{not json")
    assert store.get(KEY) is None
    assert warnings and "damaged" in warnings[0]
    assert not entry.data.parent.exists()


def _rewrite_same_size(path, *, mtime_ns: int) -> None:
    """An edit in place that keeps the size, leaving the file's mtime at ``mtime_ns`` (set
    explicitly: file clocks tick in milliseconds, so a quick rewrite may or may not move it)."""
    path.write_bytes(b"y" * path.stat().st_size)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_same_size_corruption_is_caught_when_the_mtime_moved(tmp_path):
    store = CacheStore(tmp_path)
    entry = store.put(KEY, lambda out: (out / "w.bin").write_bytes(b"x" * 1000) and {}, {})
    before = (entry.data / "w.bin").stat().st_mtime_ns
    _rewrite_same_size(entry.data / "w.bin", mtime_ns=before + 1_000_000_000)
    assert store.get(KEY) is None  # the cheap fingerprint moved: re-hashed, found changed, removed


def test_deep_check_catches_same_size_corruption_with_the_mtime_put_back(tmp_path):
    store = CacheStore(tmp_path)
    entry = store.put(KEY, lambda out: (out / "w.bin").write_bytes(b"x" * 1000) and {}, {})
    before = (entry.data / "w.bin").stat().st_mtime_ns
    _rewrite_same_size(entry.data / "w.bin", mtime_ns=before)
    assert store.get(KEY) is not None  # size and mtime as recorded: the cheap check trusts them
    assert store.get(KEY, deep=True) is None


def test_sweep_removes_temp_folders_of_dead_writers(tmp_path):
    store = CacheStore(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    from pipeline.cache import store as store_module

    stale = tmp_path / "tmp" / f"{KEY}.{store_module._HOST}.{pid}.abcd"
    live = tmp_path / "tmp" / f"{KEY}.{store_module._HOST}.{os.getppid()}.abcd"
    other_host = tmp_path / "tmp" / f"{KEY}.elsewhere.{pid}.abcd"
    for folder in (stale, live, other_host):
        (folder / "data").mkdir(parents=True)
    store.sweep()
    assert not stale.exists() and live.exists() and other_host.exists()


_RACER = """
import sys, time
from pathlib import Path
from pipeline.cache.store import CacheStore

root, who = Path(sys.argv[1]), sys.argv[2]

def build(out):
    for i in range(20):  # many files, slowly: the two writers overlap for the whole build
        (out / f"part-{i}.bin").write_bytes(who.encode() * 50_000)
        time.sleep(0.01)
    return {"who": who}

entry = CacheStore(root).put("k" * 64, build, {"stage": "race"})
print(entry.result["who"])
"""


def test_two_writers_racing_on_one_key_leave_one_whole_entry(tmp_path):
    """Two processes (two nodes of a shared cache) build the same key at once: one entry appears,
    entirely one writer's, and both get that same entry back."""
    from tests.conftest import REPO

    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(tmp_path), who], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) for who in ("A", "B")]
    winners = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(winners) == 1
    entry = CacheStore(tmp_path).get("k" * 64, deep=True)
    [who] = winners
    assert entry.result == {"who": who}
    assert {f.read_bytes() for f in entry.data.iterdir()} == {who.encode() * 50_000}
    assert not any((tmp_path / "tmp").iterdir())
