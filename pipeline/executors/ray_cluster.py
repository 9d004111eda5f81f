"""Run a plan's stages as Ray tasks across a cluster that shares the stage cache.

The DAG, the cache and the scheduler (``pipeline.executors.scheduler``) are the local executor's:
the driver walks the plan, submits every stage whose inputs are done (so independent variants run at once, on any node with room), and each task
runs the same stage code against the same cache folder, which every node mounts at the same path.
A cache entry appears by one rename, so two nodes racing on one key leave one whole entry.

Placement comes from the stage's hints: one CPU (``cpus_per_stage``), its memory estimate, a GPU
when it needs one (or, under ``--device cuda``, when it runs faster on one), and a custom resource per requirement (``gpu:sm90`` → ``gpu_sm90``,
``tensorrt_llm``), which nodes advertise with ``ray start --resources``. A stage no node can take
is reported as not built (like the local executor's stages that need other hardware), never
queued forever. Uncached stages (gates, publishing) are cheap and run on the driver.

A worker or node that dies mid-stage is a system failure: Ray retries the task (``max_retries``),
on whatever node has room; the dead writer's temp folder is never published. A stage that fails
on its own (bad input, a tool error) is not retried: its error is the run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.backends import distributions
from pipeline.cache.store import CacheStore
from pipeline.errors import ClusterError, Interrupted, ModelbuildError, StageError
from pipeline.executors.scheduler import Outcome, Progress, Report, run_stage, schedule
from pipeline.progress import PlannedStage
from pipeline.stages.base import Stage
from pipeline.stages.context import RunContext, StageInput
from pipeline.stages.status import Status

# Packages whose versions shape outputs or the stage code, every node matching the driver's:
# modelbuild's own and its core libraries, then every catalogued backend's distributions.
CORE_PACKAGES = ("modelbuild", "ray", "torch", "transformers", "safetensors", "numpy")


def checked_packages() -> tuple[str, ...]:
    backends = tuple(dist for _module, dist in distributions())
    return tuple(dict.fromkeys(CORE_PACKAGES + backends))
MAX_RETRIES = 2


@dataclasses.dataclass(frozen=True)
class Placement:
    """What one stage asks of a node."""

    cpus: float
    gpus: float
    memory: int | None
    custom: dict[str, float]

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory:
            opts["memory"] = self.memory
        if self.custom:
            opts["resources"] = dict(self.custom)
        return opts

    def lacking(self, node: dict[str, float]) -> list[str]:
        """What ``node`` (its total resources) cannot give, one name each."""
        need = {"CPU": self.cpus, "GPU": self.gpus, "memory": self.memory or 0, **self.custom}
        return [name for name, amount in need.items() if amount and node.get(name, 0) < amount]


def resource_name(requirement: str) -> str:
    """``gpu:sm90`` → ``gpu_sm90``; ``tensorrt_llm`` stays."""
    return requirement.replace(":", "_")


def placement(stage: Stage, cpus_per_stage: float, gpu_wanted: bool = False) -> Placement:
    """``gpu_wanted`` (``--device cuda``): stages that run faster on a GPU ask for one too (Ray
    hides the GPUs from a task that asked for none)."""
    hints = stage.hints
    custom = {resource_name(r): 1.0 for r in hints.requires}
    gpu = hints.needs_gpu or (hints.uses_gpu and gpu_wanted) or any(r.startswith("gpu:") for r in hints.requires)
    gpus = 1.0 if gpu else 0.0
    memory = int(hints.memory_gb * 2**30) if hints.memory_gb else None
    return Placement(cpus_per_stage, gpus, memory, custom)


# -- connecting and checking the cluster ------------------------------------------------------


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with one line instead of Ray's long retry loop on a dead address."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT", where="--address",
                           fix="give the head node's GCS address, e.g. 10.0.0.1:6379 (ray start --head prints it)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}", where="--address",
                           fix="start it with `ray start --head` there, or check the address and the firewall") from None


def connect(address: str) -> None:
    try:
        import ray
    except ImportError:
        from pipeline.errors import ToolError

        raise ToolError("Ray is not installed", where="--executor ray",
                        fix="pip install 'modelbuild[ray]' (the same Ray version on every node)") from None

    if address not in ("auto", "local"):
        _reachable(address)
    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address == "local" else address, logging_level="ERROR", log_to_driver=False,
                 configure_logging=False, include_dashboard=False if address == "local" else None,
                 namespace="modelbuild")
    except ConnectionError as e:
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}",
                           where="--address", fix="check that `ray status --address ADDR` works from here") from None


def local_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in checked_packages():
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _probe(cache_root: str, marker: str) -> dict[str, Any]:
    """Runs on each node: its versions and whether it sees the driver's cache folder."""
    return {"versions": local_versions(), "host": socket.gethostname(),
            "sees_cache": (Path(cache_root) / marker).is_file()}


def check_nodes(cache_root: Path) -> list[dict[str, Any]]:
    """Every alive node runs the probe; the first difference from the driver is an error.

    Returns:
        The alive nodes (Ray's ``ray.nodes()`` records).

    Raises:
        ClusterError: a node's package versions differ, or it cannot see the cache folder.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    marker = f".ray-probe-{os.getpid()}-{time.time_ns()}"
    cache_root.mkdir(parents=True, exist_ok=True)
    (cache_root / marker).write_text("")
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(cache_root), marker) for n in nodes}
        found = {nid: ray.get(ref, timeout=300) for nid, ref in refs.items()}
    finally:
        (cache_root / marker).unlink(missing_ok=True)
    mine = local_versions()
    for node in nodes:
        got = found[node["NodeID"]]
        name = f"node {node.get('NodeManagerAddress')} ({node['NodeID'][:8]}, {got['host']})"
        for package, version in mine.items():
            theirs = got["versions"].get(package)
            if theirs != version:
                raise ClusterError(
                    f"{name} has {package} {theirs or 'not installed'}, the driver has {version or 'not installed'}",
                    where="--executor ray", fix="install the same versions on every node (e.g. one container image)")
        if not got["sees_cache"]:
            raise ClusterError(f"{name} cannot see the cache folder {cache_root}", where="--cache-dir",
                               fix="put the cache on storage every node mounts at the same path (NFS, a shared disk)")
    return nodes


# -- running ------------------------------------------------------------------------------------


class _Quiet:
    """A reporter for stages on remote nodes (the driver prints the stage lines): a
    ``progress.RunReporter`` that prints nothing."""

    def run(self, plan: Sequence[PlannedStage]) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext(self)  # the driver's reporter spans the run

    def stage(self, *a, **k) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def steps(self, description: str, total: int) -> contextlib.AbstractContextManager[Callable[..., None]]:
        return contextlib.nullcontext(lambda n=1: None)


def _remote_stage(ctx: RunContext, cache_root: str, stage: Stage, inputs: dict[str, StageInput]) -> tuple[Outcome, dict]:
    """The body of a Ray task: the scheduler's stage logic on this node."""
    import ray

    started = time.time()
    store = CacheStore(Path(cache_root))
    outcome = run_stage(ctx, store, stage, inputs)
    where = {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
             "started": started, "ended": time.time()}
    return outcome, where


@dataclasses.dataclass
class RayReport(Report):
    """The local report plus where and when each remote stage ran."""

    placements: dict[str, dict] = dataclasses.field(default_factory=dict)


class RayExecutor:
    """Ready cached stages not in the cache yet go to the cluster as tasks (placed by their
    hints); uncached ones (cheap: gates, publishing) and cache hits are handled on the driver. A
    stage no node can take is not built (``needs``)."""

    def __init__(self, ctx: RunContext, store: CacheStore, report: RayReport, *, cpus_per_stage: float,
                 max_retries: int, totals: list[dict[str, float]]):
        import ray

        self.ctx, self.store, self.report = ctx, store, report
        self.cpus_per_stage, self.max_retries, self.totals = cpus_per_stage, max_retries, totals
        self.remote = ray.remote(max_retries=max_retries, retry_exceptions=False)(_remote_stage)
        self.ctx_ref = ray.put(dataclasses.replace(ctx, reporter=_Quiet(), _storage=None))
        self.running: dict[Any, Stage] = {}

    def submit(self, stage: Stage, inputs: dict[str, StageInput], progress: Progress) -> Outcome | None:
        if not stage.cached:
            return run_stage(self.ctx, self.store, stage, inputs, progress)
        entry = self.store.get(stage.key)
        if entry is not None:
            return Outcome(stage, Status.CACHED, entry.result, 0.0, entry)
        place = placement(stage, self.cpus_per_stage, gpu_wanted=self.ctx.requested_device.startswith("cuda"))
        if not any(not place.lacking(t) for t in self.totals):
            lacking = sorted({name for t in self.totals for name in place.lacking(t)})
            return Outcome(stage, Status.NEEDS, {"needs": [
                f"a Ray node with {', '.join(lacking)} (no node of the cluster has it; "
                "advertise it with `ray start --resources`)"]}, 0.0)
        progress.running(stage)
        ref = self.remote.options(**place.options(), name=stage.id).remote(self.ctx_ref, str(self.store.root), stage,
                                                                           inputs)
        self.running[ref] = stage
        return None

    def collect(self) -> tuple[Stage, Outcome] | None:
        import ray
        from ray.exceptions import RayTaskError, TaskCancelledError

        if not self.running:
            return None
        done, _ = ray.wait(list(self.running), num_returns=1)
        stage = self.running.pop(done[0])
        try:
            outcome, where = ray.get(done[0])
        except RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
            if isinstance(cause, ModelbuildError):
                raise cause from None
            raise StageError(f"stage {stage.id} failed on the cluster: {str(cause or e).splitlines()[0]}",
                             fix="rerun with MODELBUILD_DEBUG=1; the node's log is in its Ray session folder") from None
        except TaskCancelledError:
            raise Interrupted(f"stage {stage.id} was cancelled", fix="rerun the same command to resume") from None
        except ray.exceptions.RayError as e:  # the worker or node died more than max_retries times
            raise StageError(f"stage {stage.id} lost its worker {self.max_retries + 1} times: {type(e).__name__}",
                             fix="check the cluster's nodes (memory, preemption); rerun to resume from the cache") from None
        self.report.placements[stage.id] = where
        return stage, outcome

    def cancel(self) -> None:
        import ray

        for ref in self.running:
            ray.cancel(ref, force=True)
        self.running.clear()


def execute(plan, ctx: RunContext, store: CacheStore, *, address: str, cpus_per_stage: float = 1.0,
            max_retries: int = MAX_RETRIES) -> RayReport:
    """Run every stage of ``plan`` on the Ray cluster at ``address`` (``local``: start one here).

    Raises:
        ClusterError: unreachable cluster, mismatched nodes, a node without the cache.
        Interrupted: Ctrl-C (running tasks are cancelled; nothing half-written is kept).
        StageError / ModelbuildError: as the local executor, from whichever node ran the stage.
    """
    connect(address)
    nodes = check_nodes(store.root)
    report = RayReport()
    executor = RayExecutor(ctx, store, report, cpus_per_stage=cpus_per_stage, max_retries=max_retries,
                           totals=[n.get("Resources", {}) for n in nodes])
    schedule(plan, ctx, executor, report)
    return report
