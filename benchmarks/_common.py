"""Helpers shared by the benchmark scripts (run as scripts: this folder is on sys.path) and, for
the memory cgroup (``MemoryCgroup``, ``evict_from_page_cache``), by the scale test
(``tests/test_scale.py`` imports ``benchmarks._common``): standard library only at import time."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CGROUP_V1 = Path("/sys/fs/cgroup/memory")  # the v1 memory controller's hierarchy
CGROUP_V2 = Path("/sys/fs/cgroup")  # the unified hierarchy, where it is the only one


class MemoryCgroup:
    """A memory limit, page cache included, that child processes join before they exec.

    cgroup v1 (``memory.limit_in_bytes``, and the memory+swap limit where the kernel has one) or
    v2 (``memory.max``, ``memory.swap.max`` 0), whichever this machine has; creating one needs root.
    Both count the page cache a member reads or writes against the limit (v1 charges a page to the
    cgroup that first touched it: see ``evict_from_page_cache``); under the limit the kernel
    reclaims clean cache before it kills anything.

    Args:
        limit_bytes: the limit.
        name: the cgroup's folder name (default ``modelbuild-<pid>``; made unique per instance).

    Attributes:
        enforced: the cgroup exists and has the limit; when False, ``reason`` says why and
            ``join`` does nothing.
        version: 1 or 2 (None when not enforced).

    Usage: ``subprocess.Popen(cmd, preexec_fn=cgroup.join)``; ``peak()`` after it ends; ``close()``.
    """

    _made = 0

    def __init__(self, limit_bytes: int, name: str | None = None):
        MemoryCgroup._made += 1
        name = name or f"modelbuild-{os.getpid()}-{MemoryCgroup._made}"
        self.limit = limit_bytes
        self.enforced, self.version, self.reason = False, None, None
        self.path = CGROUP_V1 / name
        try:
            if (CGROUP_V1 / "memory.limit_in_bytes").is_file():
                self.path.mkdir()
                (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
                if (self.path / "memory.memsw.limit_in_bytes").is_file():  # no swapping around the limit
                    (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
                self.version = 1
            elif "memory" in _read(CGROUP_V2 / "cgroup.controllers").split():
                if "memory" not in _read(CGROUP_V2 / "cgroup.subtree_control").split():
                    (CGROUP_V2 / "cgroup.subtree_control").write_text("+memory")
                self.path = CGROUP_V2 / name
                self.path.mkdir()
                (self.path / "memory.max").write_text(str(limit_bytes))
                if (self.path / "memory.swap.max").is_file():
                    (self.path / "memory.swap.max").write_text("0")
                self.version = 2
            else:
                self.reason = "no cgroup memory controller on this machine (neither v1 nor v2)"
                return
            self.enforced = True
        except OSError as e:
            self.reason = f"cannot create a memory cgroup at {self.path}: {e.strerror or e} (needs root)"
            self.version = None
            with contextlib.suppress(OSError):
                self.path.rmdir()

    def join(self) -> None:
        """Move the calling process into the cgroup (a ``preexec_fn``: the child joins before exec)."""
        if self.enforced:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def reset_peak(self) -> None:
        """Start the peak over (v1 only; on v2 the peak counts from the cgroup's creation: use one
        cgroup per measured command)."""
        if self.version == 1:
            with contextlib.suppress(OSError):
                (self.path / "memory.max_usage_in_bytes").write_text("0")

    def peak(self) -> int | None:
        """The most memory (page cache included) the members used, in bytes; None when unknown."""
        name = {1: "memory.max_usage_in_bytes", 2: "memory.peak"}.get(self.version or 0)
        try:
            return int(_read(self.path / name)) if name else None
        except (OSError, ValueError):
            return None

    def anon(self) -> int:
        """The members' anonymous memory now, in bytes (every process of the tree: tools a step
        runs as subprocesses count too); 0 when unknown."""
        key = {1: "rss", 2: "anon"}.get(self.version or 0)
        with contextlib.suppress(OSError, ValueError):
            for line in _read(self.path / "memory.stat").splitlines() if key else ():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        return 0

    def oom_kills(self) -> int:
        """How many members the kernel killed for going over the limit."""
        text = {1: "memory.oom_control", 2: "memory.events"}.get(self.version or 0)
        with contextlib.suppress(OSError):
            for line in _read(self.path / text).splitlines() if text else ():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def close(self) -> None:
        """Remove the cgroup (its members must have exited; retried while the kernel lets them go)."""
        if not self.enforced:
            return
        for _ in range(20):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.25)

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cgroup_unavailable() -> str | None:
    """Why no memory cgroup can be made here (None: one can): a test's skip condition, decided
    by making and removing one."""
    probe = MemoryCgroup(1 << 30, name=f"modelbuild-probe-{os.getpid()}")
    probe.close()
    return None if probe.enforced else probe.reason


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def evict_from_page_cache(folder: Path) -> None:
    """Write the folder's files to disk and drop their pages from the page cache, so that a later
    reader reads from disk and the pages it reads are charged to its own cgroup (v1 charges a page
    to whoever first touched it)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(cmd: list[str]) -> dict:
    """Wall time and this child's own peak RSS (from ``wait4``) of one command; exits on failure.

    Output is drained while waiting, so full pipes never stall the child.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: dict[str, bytes] = {}
    threads = [threading.Thread(target=lambda n=n, s=s: out.__setitem__(n, s.read())) for n, s in
               (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    for t in threads:
        t.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"command failed ({code}): {' '.join(cmd[:4])}...\n{out['stderr'].decode()[-3000:]}")
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "stdout": out["stdout"].decode(),
            "stderr": out["stderr"].decode()}


def run_sampled(cmd: list[str], cgroup: MemoryCgroup | None = None, env: dict[str, str] | None = None) -> dict:
    """One command in ``cgroup`` (if given): wall time, peak resident memory (``wait4``; it counts
    memory-mapped file pages, which the kernel drops under a limit instead of failing), peak
    anonymous memory (sampled every 0.1 s: the command's own, or in a cgroup the whole process
    tree's, whichever is larger), the cgroup's peak, exit status, output.

    Returns bytes as ``rss_mb``/``anon_mb``/``cgroup_mb`` (MiB) and ``stderr`` (its last 2,000
    characters); never exits on failure (the callers show a limit's kill).
    """
    if cgroup is not None:
        cgroup.reset_peak()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=cgroup.join if cgroup is not None else None)
    out: dict[str, bytes] = {}
    threads = [threading.Thread(target=lambda n=n, s=s: out.__setitem__(n, s.read())) for n, s in
               (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in threads:
        t.start()
    anon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon = max(anon, int(line.split()[1]) * 1024)
        if cgroup is not None:
            anon = max(anon, cgroup.anon())
        time.sleep(0.1)
    wall = time.perf_counter() - start
    for t in threads:
        t.join()
    peak = cgroup.peak() if cgroup is not None else None
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "anon_mb": anon / 2**20,
            "cgroup_mb": None if peak is None else peak / 2**20, "exit": os.waitstatus_to_exitcode(status),
            "stdout": out.get("stdout", b"").decode(errors="replace"),
            "stderr": out.get("stderr", b"").decode(errors="replace")[-2000:]}


def single_variant_recipe(recipe: Path, name: str, folder: Path) -> Path:
    """The recipe reduced to one variant (relative corpus paths made absolute), written to ``folder``."""
    import yaml

    data = yaml.safe_load(recipe.read_text())
    data["variants"] = [v for v in data["variants"] if v["name"] == name]
    for section, key in (("calibration", "path"), ("eval", "corpus")):
        if section in data and key in data[section]:
            data[section][key] = str((recipe.parent / data[section][key]).resolve())
    path = folder / f"{name}-only.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def calibration_windows(recipe, variant, tokenizer) -> list[list[int]]:
    """The calibration windows a by-hand script uses: the recipe's text tokenized once,
    ``samples`` windows of ``seq_len`` tokens picked with ``seed`` (variant overrides applied),
    as an engineer would write it (the same picks modelbuild makes, computed independently)."""
    import random

    cal = recipe.calibration
    over = variant.calibration
    n = over.samples if over and over.samples else cal.samples
    length = over.seq_len if over and over.seq_len else cal.seq_len
    ids = tokenizer(Path(cal.path).read_text(), add_special_tokens=False)["input_ids"]
    picks = sorted(random.Random(cal.seed).sample(range(len(ids) // length), n))
    return [ids[w * length:(w + 1) * length] for w in picks]


# The start of a child script that runs single stages of a recipe outside `modelbuild run`:
# argv[1:4] = recipe, shared cache, scratch folder; defines `prepared`, `plan`, `ctx` and `fetch`
# (the recipe's fetch stage, from the shared cache). Stages built from it go into the scratch cache.
STAGE_SCRIPT_PROLOGUE = """
import sys, json
from pathlib import Path
from pipeline.cache.store import CacheStore
from pipeline.run.orchestrate import prepare
from pipeline.progress import Reporter
from pipeline.stages import runner
from pipeline.stages.context import RunContext, StageInput
recipe, cache, scratch = sys.argv[1:4]
reporter = Reporter()
prepared = prepare(Path(recipe), cache_dir=Path(cache), storage=None, reporter=reporter)
plan = prepared.plan
ctx = RunContext(loaded=prepared.loaded, source=plan.source, storage_root=Path(scratch), requested_device="cpu",
                 reporter=reporter, plan=plan)
fetch = prepared.store.get(plan.by_id()["fetch"].key)
assert fetch is not None, "run the recipe's fetch stage first"
"""
