"""The Ray executor on a real local cluster: a head node and a second node started by the test
(`ray start` on loopback, one CPU each), the tiny-model recipe with several variants, a node killed
mid-stage, and the bad inputs (unreachable address, a stage no node can take, a node whose
packages differ from the driver's)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, _free_port

RAY = str(Path(sys.executable).parent / "ray")
ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
VARIANTS = "".join(f"  - name: {n}\n    backend: llmcompressor\n    scheme: {s}\n" + (f"    group_size: {g}\n" if g else "")
                   for n, s, g in [("w8a16", "W8A16", 32), ("w4a16", "W4A16", 32), ("nvfp4a16", "NVFP4A16", None)])


class Cluster:
    """`ray start --head` plus extra nodes, each `ray start --block` in its own session (so a
    test can kill a whole node: its raylet and its workers)."""

    def __init__(self, temp: Path):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = temp
        self.nodes: list[subprocess.Popen] = []
        subprocess.run([RAY, "start", "--head", "--port", str(self.port), "--num-cpus", "1", "--node-ip-address",
                        "127.0.0.1", "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp)],
                       check=True, env={**os.environ, **ENV}, capture_output=True, timeout=180)

    def add_node(self, env: dict | None = None, resources: str | None = None) -> subprocess.Popen:
        cmd = [RAY, "start", "--address", self.address, "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--block"]
        if resources:
            cmd += ["--resources", resources]
        # Started outside the repository, as on a real node (the repository's own metadata must
        # not stand in for what is installed there).
        node = subprocess.Popen(cmd, env={**os.environ, **ENV, **(env or {})}, start_new_session=True, cwd="/",
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.nodes.append(node)
        self.wait_for(1 + len(self.nodes))
        return node

    def alive(self) -> int:
        probe = (f"import ray; ray.init(address={self.address!r}, logging_level='ERROR');"
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **ENV}, capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0

    def wait_for(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while self.alive() != n:
            assert time.time() < deadline, f"the cluster never had {n} alive nodes"
            time.sleep(1)

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
        return out

    def workers(self, node: subprocess.Popen) -> set[int]:
        """The worker processes of ``node`` (children of its raylet; Ray gives each its own
        process group, so the node's group does not hold them)."""
        raylets = [c for c in self._children(node.pid)
                   if "raylet/raylet" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]
        return {w for r in raylets for w in self._children(r)}

    def kill_node(self, node: subprocess.Popen) -> None:
        """SIGKILL the whole node: its workers, then its raylet and the rest of its group."""
        for pid in self.workers(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def stop(self) -> None:
        for node in self.nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
        subprocess.run([RAY, "stop", "--force"], env={**os.environ, **ENV}, capture_output=True, timeout=120)


@pytest.fixture
def dirs(tmp_path) -> dict[str, Path]:
    return {"cache": tmp_path / "cache", "storage": tmp_path / "store", "reports": tmp_path / "reports"}


@pytest.fixture
def cluster():
    # Ray's socket paths must stay short: a temp dir of its own under /tmp.
    temp = Path(f"/tmp/ray-{os.getpid()}")
    c = Cluster(temp)
    try:
        yield c
    finally:
        c.stop()


def _run(recipe: Path, dirs, address: str, *extra: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe), "--cache-dir", str(dirs["cache"]),
                           "--storage", str(dirs["storage"]), "--executor", "ray", "--address", address,
                           "--report-dir", str(dirs["reports"]), *extra],
                          cwd=cwd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=1200)


def _published(storage: Path) -> list[str]:
    return sorted(p.parent.parent.name for p in storage.rglob("manifest.json"))


def test_variants_run_in_parallel_on_two_nodes(cluster, recipe_factory, dirs):
    cluster.add_node()
    recipe = recipe_factory(variant_extra=VARIANTS)
    done = _run(recipe, dirs, cluster.address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _published(dirs["storage"]) == ["fp8", "nvfp4a16", "w4a16", "w8a16"]
    placements = json.loads((dirs["reports"] / "summary.json").read_text())["placements"]
    assert len({p["node"] for p in placements.values()}) == 2  # both nodes worked
    # Independent stages ran at the same time on the two nodes (e.g. the baseline's eval beside
    # the variants' quantization).
    assert any(a["node"] != b["node"] and a["started"] < b["ended"] and b["started"] < a["ended"]
               for a in placements.values() for b in placements.values())
    # The same cache and store as a local run: a local rerun does nothing.
    again = subprocess.run([sys.executable, "-m", "pipeline", "run", str(recipe), "--cache-dir", str(dirs["cache"]),
                            "--storage", str(dirs["storage"])], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and ": done" not in again.stderr, again.stderr


def test_a_node_killed_mid_stage_is_survived(cluster, recipe_factory, dirs):
    """The extra node dies (raylet and workers, SIGKILL) while it runs a stage: Ray retries the
    stage on the node left, the run finishes, every variant is published, nothing partial stays."""
    extra = cluster.add_node()
    recipe = recipe_factory(tokens=60_000, variant_extra=VARIANTS.split("  - name: w4a16")[0])
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(recipe), "--cache-dir", str(dirs["cache"]), "--storage",
         str(dirs["storage"]), "--executor", "ray", "--address", cluster.address, "--report-dir", str(dirs["reports"])],
        cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = dirs["cache"] / "tmp"
    deadline = time.time() + 600
    victim = None
    while victim is None:
        assert proc.poll() is None, f"the run ended before the extra node took a stage: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "the extra node never ran a stage"
        on_extra = cluster.workers(extra)
        for folder in tmp.iterdir() if tmp.is_dir() else []:
            # <key>.<host>.<pid>.<random>: a stage being written by a worker of the extra node,
            # for more than a second (a long one, still running).
            with contextlib.suppress(FileNotFoundError):
                if int(folder.name.split(".")[2]) in on_extra and time.time() - folder.stat().st_mtime > 1.0:
                    victim = folder.name.split(".")[0]
        time.sleep(0.2)
    cluster.kill_node(extra)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert _published(dirs["storage"]) == ["fp8", "w8a16"]
    placements = json.loads((dirs["reports"] / "summary.json").read_text())["placements"]
    assert len({p["node"] for p in placements.values()}) >= 1
    from pipeline.cache.store import CacheStore

    store = CacheStore(dirs["cache"])
    assert store.get(victim, deep=True) is not None  # the killed stage was built again, whole
    assert not [p for p in tmp.iterdir() if p.name.startswith(victim)]  # the dead writer's folder is gone


def test_a_killed_driver_resumes_from_the_cache(cluster, recipe_factory, dirs):
    """SIGKILL the driver once a stage is cached: Ray ends its job; the rerun reuses what was
    finished and builds the rest."""
    recipe = recipe_factory(tokens=30_000)
    cmd = [sys.executable, "-m", "pipeline", "run", str(recipe), "--cache-dir", str(dirs["cache"]), "--storage",
           str(dirs["storage"]), "--executor", "ray", "--address", cluster.address, "--report-dir", str(dirs["reports"])]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    objects = dirs["cache"] / "objects"
    deadline = time.time() + 600
    while not (objects.is_dir() and any(objects.glob("*/*/entry.json"))):
        assert proc.poll() is None and time.time() < deadline, "the driver ended before a stage was cached"
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert _published(dirs["storage"]) == []
    again = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[1/6] fetch: cached" in again.stderr and _published(dirs["storage"]) == ["fp8"]


def test_unreachable_address_is_one_line(recipe_factory, dirs):
    done = _run(recipe_factory(), dirs, f"127.0.0.1:{_free_port()}")
    assert done.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_stage_no_node_can_take_is_reported_not_queued(cluster, tmp_path, tiny_model, wikitext, dirs):
    """A TensorRT-LLM engine for H100 needs gpu_sm90 and tensorrt_llm: no node advertises them, so
    the stage is reported as not built with the missing resources (exit 6) instead of waiting."""
    from tests.backends.test_modelopt import modelopt_recipe

    recipe = modelopt_recipe(tmp_path, tiny_model, wikitext, """\
        - name: mo-fp8
          backend: modelopt
          qformat: fp8
          engines: [{gpu: H100}]
        """)
    done = _run(recipe, dirs, cluster.address)
    assert done.returncode == 6, done.stderr[-3000:]
    [line] = [x for x in done.stderr.splitlines() if x.startswith("engine/mo-fp8/")]
    assert "gpu_sm90" in line and "tensorrt_llm" in line and "ray start --resources" in line, line
    assert _published(dirs["storage"]) == ["mo-fp8"]  # the checkpoint itself was built and published


def test_a_node_with_other_package_versions_is_named(cluster, recipe_factory, dirs, tmp_path):
    """The extra node sees another modelbuild (a different install on that machine): the run stops
    before any stage, naming the node, the package and both versions."""
    fake = tmp_path / "other-site"
    (fake / "modelbuild-9.9.9.dist-info").mkdir(parents=True)
    (fake / "modelbuild-9.9.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: modelbuild\nVersion: 9.9.9\n")
    cluster.add_node(env={"PYTHONPATH": str(fake)})
    # Ray puts the driver's folder on its workers' path: drive from outside the repository, whose
    # own build metadata would otherwise stand in for what each node has installed.
    done = _run(recipe_factory(), dirs, cluster.address, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "has modelbuild 9.9.9, the driver has 0.1.0" in done.stderr
    assert re.search(r"node \S+ \([0-9a-f]{8}, ", done.stderr)  # the node by address and id
    assert len(done.stderr.strip().splitlines()) == 1 and not (dirs["cache"] / "objects").exists()


def test_unknown_executor_is_one_line(cli, recipe_factory):
    code, _out, err = cli("run", recipe_factory(), "--executor", "dask")
    assert code == 2 and "--executor: unknown executor 'dask'" in err and len(err.strip().splitlines()) == 1


def test_placement_from_hints():
    from pipeline.executors.ray_cluster import Placement, placement
    from pipeline.stages.base import Hints, Stage

    engine = Stage(id="engine/x", kind="trtllm_engine", params={}, hints=Hints(needs_gpu=True, memory_gb=2,
                   requires=("gpu:sm90", "tensorrt_llm")))
    p = placement(engine, 1.0)
    assert p == Placement(cpus=1.0, gpus=1.0, memory=2 * 2**30, custom={"gpu_sm90": 1.0, "tensorrt_llm": 1.0})
    assert p.lacking({"CPU": 8, "GPU": 8, "memory": 64 * 2**30, "gpu_sm100": 8}) == ["gpu_sm90", "tensorrt_llm"]
    assert p.lacking({"CPU": 8, "GPU": 8, "memory": 64 * 2**30, "gpu_sm90": 8, "tensorrt_llm": 8}) == []
    assert p.options() == {"num_cpus": 1.0, "num_gpus": 1.0, "memory": 2 * 2**30,
                           "resources": {"gpu_sm90": 1.0, "tensorrt_llm": 1.0}}
