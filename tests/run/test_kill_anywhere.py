"""SIGKILL `modelbuild run` at many moments across a whole small run, publish included, rerunning
after each: the store always verifies, nothing partial is ever visible, and the store the reruns
end with equals an uninterrupted run's.

The moments are events seen on disk (a stage's entry being written in the cache, the n-th entry
finished, a version being staged or claimed in the store) plus a seeded random delay, so the kills
land everywhere whatever the machine's speed, and no assertion depends on where they landed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

KILLS = 30


def _store_view(storage: Path) -> dict[str, dict[str, str]]:
    """Variant -> {path: sha256} of the files that come from the build (the model card and serving
    profiles name the version and its path, which differ between two stores)."""
    out = {}
    for manifest_path in sorted(storage.glob("*/*/*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        out[manifest["variant"]] = {f["path"]: f["sha256"] for f in manifest["files"]
                                    if f["path"] != "README.md" and not f["path"].startswith("serving/")}
    return out


def _assert_whole(storage: Path) -> None:
    """What any reader can see is complete and verified."""
    from pipeline.storage.consume import verify
    from pipeline.storage.local import LocalStorage
    from pipeline.storage.refs import Ref
    from pipeline.storage.registry import channels, read_index, versions

    if not storage.exists():
        return
    store = LocalStorage(storage)
    for entry in read_index(store)["entries"]:
        assert entry["version"] in versions(store, entry["model"], entry["variant"]), entry
    for manifest_path in storage.glob("*/*/*/manifest.json"):
        model, variant, version = manifest_path.parent.relative_to(storage).parts
        assert verify(store, Ref(model, variant, version))[2] == []
        for pointed in channels(store, model, variant).values():
            assert pointed in versions(store, model, variant)


def _moment(rng: random.Random, stages: int):
    """A predicate on (cache, store) that becomes true at one moment of a run."""
    kind = rng.choice(["stage", "stage", "finished", "publish", "claim"])
    n = rng.randrange(stages)

    def entries(cache: Path) -> int:
        return len(list((cache / "objects").glob("*/*/entry.json"))) if (cache / "objects").exists() else 0

    def writing(cache: Path) -> bool:
        return (cache / "tmp").is_dir() and any((cache / "tmp").iterdir())

    if kind == "stage":  # inside the (n+1)-th cached stage, while it writes its entry
        return lambda cache, store: entries(cache) >= n and writing(cache)
    if kind == "finished":  # right after the n-th entry became visible
        return lambda cache, store: entries(cache) >= n
    if kind == "publish":  # a version being assembled beside its final place
        return lambda cache, store: any(store.glob("*/*/.staging-*"))
    return lambda cache, store: any(store.glob("*/*/.claims/*.json"))


# Each run is a fork of one interpreter that has done the heavy imports once (and no computation,
# so forking it is safe): 40 runs cost their work, not 40 imports of torch. A forked child runs
# the console entry point itself, `pipeline.cli.main.main`, and is what gets the SIGKILL.
_ZYGOTE = r"""
import json, os, sys
import pipeline.cli.main as cli
import llmcompressor, torch, transformers  # noqa: F401  (imported once, before any fork)
print("@@ ready", flush=True)
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        try:
            cli.main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            code = 1
        sys.stderr.flush()
        os._exit(code)
    print("@@", pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("@@", os.waitstatus_to_exitcode(status), flush=True)
"""


class Runs:
    """``modelbuild run`` as forks of a pre-imported interpreter."""

    def __init__(self, recipe: Path, logs: Path):
        self.recipe, self.logs, self.count = recipe, logs, 0
        logs.mkdir(parents=True, exist_ok=True)
        self.zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE], cwd=REPO, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        assert self._answer() == "ready"

    def start(self, cache: Path, store: Path) -> tuple[int, Path]:
        self.count += 1
        log = self.logs / f"run-{self.count}.log"
        argv = ["run", str(self.recipe), "--cache-dir", str(cache), "--storage", str(store),
                "--report-dir", str(self.logs / f"reports-{self.count}")]
        self.zygote.stdin.write(json.dumps([argv, str(log)]) + "\n")
        self.zygote.stdin.flush()
        return int(self._answer()), log

    def wait(self) -> int:
        return int(self._answer())

    def _answer(self) -> str:
        # Libraries print to stdout too (llm-compressor's device notice): the protocol's lines
        # carry a prefix of their own.
        while True:
            line = self.zygote.stdout.readline()
            assert line, "the run server ended"
            if line.startswith("@@ "):
                return line[3:].strip()

    def close(self) -> None:
        self.zygote.stdin.close()
        self.zygote.wait(timeout=60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that has exited but is not reaped yet is a zombie: not running any more.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_killed_anywhere_the_store_stays_whole_and_ends_as_an_uninterrupted_run(recipe_factory, tmp_path):
    recipe = recipe_factory(extra=(
        "  - name: q8\n    backend: llmcompressor\n    scheme: W8A16\n    group_size: 64\n"))
    runs = Runs(recipe, tmp_path / "logs")
    try:
        reference = tmp_path / "reference"
        _pid, log = runs.start(reference / "cache", reference / "store")
        assert runs.wait() == 0, log.read_text()[-3000:]
        expected = _store_view(reference / "store")
        assert set(expected) == {"fp8", "q8"}
        stages = len(list((reference / "cache" / "objects").glob("*/*/entry.json")))

        rng = random.Random(20261201)
        kills, round_ = 0, 0
        while kills < KILLS:
            assert round_ < 3 * KILLS, f"only {kills} runs could be killed mid-way"
            # Every few kills a fresh cache and store, so the kills spread over whole runs, not
            # only over the publishes of an almost finished one.
            round_ += 1
            cache, store = tmp_path / f"r{round_}" / "cache", tmp_path / f"r{round_}" / "store"
            for _ in range(5):
                pid, _log = runs.start(cache, store)
                moment, delay = _moment(rng, stages), rng.uniform(0, 0.3)
                while _alive(pid) and not moment(cache, store):
                    time.sleep(0.005)
                if _alive(pid):
                    time.sleep(delay)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                runs.wait()
                _assert_whole(store)
            _pid, log = runs.start(cache, store)
            assert runs.wait() == 0, log.read_text()[-3000:]
            _assert_whole(store)
            assert _store_view(store) == expected
            assert all(len(list(store.glob(f"*/{v}/2*/manifest.json"))) == 1 for v in expected)
    finally:
        runs.close()
