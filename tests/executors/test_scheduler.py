"""The scheduler every executor shares: ready set, inputs by role, the blocked-by-input rule,
outcomes and their statuses; and stage keys, which roles and variants must not change."""

from __future__ import annotations

import json
from types import ModuleType, SimpleNamespace
from typing import TypedDict

import pytest

from pipeline.cache.store import CacheStore
from pipeline.errors import StageError
from pipeline.executors import memory, scheduler
from pipeline.executors.scheduler import Outcome, Report, run_stage, schedule
from pipeline.stages.base import Hints, Stage
from pipeline.stages.context import StageInput
from pipeline.stages.status import Status


class _Reporter:
    def __init__(self):
        self.lines: list[tuple[str, str]] = []
        self.peaks: dict[str, int | None] = {}

    def stage(self, index, total, stage_id, status, seconds=None, peak_bytes=None):
        self.lines.append((stage_id, status))
        self.peaks[stage_id] = peak_bytes


def _kind(name: str, inputs: type | None = None, result=None) -> ModuleType:
    """A stage kind whose runner records the inputs it got."""
    module = ModuleType(name)
    module.calls = []

    def run(ctx, stage, got, out=None):
        module.calls.append(got)
        return dict(result or {"made": stage.id, "from": {role: i.result.get("made") for role, i in got.items()}})

    module.run = run
    if inputs is not None:
        module.Inputs = inputs
    return module


class _SourceInputs(TypedDict):
    pass


class _UseAlways(TypedDict):
    checkpoint: StageInput


class _UseInputs(_UseAlways, total=False):
    gate: StageInput


@pytest.fixture
def kinds(monkeypatch):
    table = {"source": _kind("source", _SourceInputs), "use": _kind("use", _UseInputs),
             "verdict": _kind("verdict", _SourceInputs, {"passed": True})}
    monkeypatch.setattr(scheduler, "runner", table.__getitem__)
    return table


class _Local:
    """Runs each stage at once, as the local executor does."""

    def __init__(self, ctx, store):
        self.ctx, self.store = ctx, store

    def submit(self, stage, inputs, progress):
        return run_stage(self.ctx, self.store, stage, inputs, progress)

    def collect(self):
        return None

    def cancel(self):
        pass


class _HandOff(_Local):
    """Hands every cached stage off and returns them later, last handed off first."""

    def __init__(self, ctx, store):
        super().__init__(ctx, store)
        self.out: list = []

    def submit(self, stage, inputs, progress):
        if not stage.cached:
            return super().submit(stage, inputs, progress)
        self.out.append((stage, run_stage(self.ctx, self.store, stage, inputs)))
        return None

    def collect(self):
        return self.out.pop() if self.out else None


def _run(tmp_path, stages, executor=_Local):
    ctx = SimpleNamespace(reporter=_Reporter(), requested_device="cpu")
    store = CacheStore(tmp_path / "cache")
    plan = SimpleNamespace(stages=tuple(stages))
    return schedule(plan, ctx, executor(ctx, store)), ctx.reporter


def _keyed(stage: Stage, n: int) -> Stage:
    from dataclasses import replace

    return replace(stage, key=f"{n:02d}" + "0" * 62)


def test_inputs_arrive_by_role(tmp_path, kinds):
    a = _keyed(Stage(id="a", kind="source", params={}), 1)
    b = _keyed(Stage.wired(id="b/x", kind="use", params={}, inputs={"checkpoint": "a"}, variant="x"), 2)
    report, _ = _run(tmp_path, [a, b])
    (got,) = kinds["use"].calls
    assert list(got) == ["checkpoint"] and got["checkpoint"].result == {"made": "a", "from": {}}
    assert got["checkpoint"].status == Status.BUILT and got["checkpoint"].data.is_dir()
    assert report.outcomes["b/x"].result == {"made": "b/x", "from": {"checkpoint": "a"}}
    assert [o.status for o in report.outcomes.values()] == [Status.BUILT, Status.BUILT]


def test_after_inputs_arrive_by_role_too(tmp_path, kinds):
    a = _keyed(Stage(id="a", kind="source", params={}), 1)
    g = _keyed(Stage(id="g", kind="verdict", params={}, cached=False), 2)
    b = _keyed(Stage.wired(id="b", kind="use", params={}, inputs={"checkpoint": "a"}, after={"gate": "g"}), 3)
    report, _ = _run(tmp_path, [a, g, b])
    (got,) = kinds["use"].calls
    assert set(got) == {"checkpoint", "gate"} and got["gate"].result == {"passed": True}
    assert got["gate"].status == Status.RAN and report.outcomes["g"].status == Status.RAN


def test_an_input_not_built_blocks_what_reads_it(tmp_path, kinds):
    a = _keyed(Stage(id="a", kind="source", params={}, hints=Hints(requires=("no-such-thing",))), 1)
    b = _keyed(Stage.wired(id="b", kind="use", params={}, inputs={"checkpoint": "a"}), 2)
    c = _keyed(Stage.wired(id="c", kind="use", params={}, inputs={"checkpoint": "b"}), 3)
    report, reporter = _run(tmp_path, [a, b, c])
    assert kinds["use"].calls == [] and kinds["source"].calls == []
    out = report.outcomes
    assert out["a"].status == Status.NEEDS and out["a"].result == {"needs": ["unknown requirement 'no-such-thing'"]}
    assert out["b"].status == Status.NEEDS and out["b"].result["blocked_by"] == "a"
    assert out["c"].status == Status.NEEDS and out["c"].result["blocked_by"] == "b"
    assert [o.stage.id for o in report.not_built()] == ["a"]  # the first of the chain only
    assert ("b", "[yellow]not built[/yellow] (waits for a)") in reporter.lines


def test_a_skipped_input_blocks_with_its_reason(tmp_path, kinds, monkeypatch):
    from pipeline.errors import StageSkipped

    def skip(ctx, stage, inputs, out=None):
        raise StageSkipped("nothing to do")

    monkeypatch.setattr(kinds["source"], "run", skip)
    a = _keyed(Stage(id="a", kind="source", params={}), 1)
    b = _keyed(Stage.wired(id="b", kind="use", params={}, inputs={"checkpoint": "a"}), 2)
    report, reporter = _run(tmp_path, [a, b])
    assert report.outcomes["a"].status == Status.SKIPPED
    assert report.outcomes["b"].status == Status.SKIPPED
    assert report.outcomes["b"].result == {"reason": "nothing to do", "blocked_by": "a"}
    assert ("a", "skipped (nothing to do)") in reporter.lines


def test_a_second_run_is_served_from_the_cache(tmp_path, kinds):
    stages = [_keyed(Stage(id="a", kind="source", params={}), 1),
              _keyed(Stage.wired(id="b", kind="use", params={}, inputs={"checkpoint": "a"}), 2)]
    _run(tmp_path, stages)
    report, reporter = _run(tmp_path, stages)
    assert [o.status for o in report.outcomes.values()] == [Status.CACHED, Status.CACHED]
    assert report.ran() == [] and reporter.lines == [("a", "cached"), ("b", "cached")]
    assert len(kinds["use"].calls) == 1


def test_handed_off_stages_are_collected_and_their_dependants_wait(tmp_path, kinds):
    a = _keyed(Stage(id="a", kind="source", params={}), 1)
    b1 = _keyed(Stage.wired(id="b1", kind="use", params={}, inputs={"checkpoint": "a"}), 2)
    b2 = _keyed(Stage.wired(id="b2", kind="use", params={}, inputs={"checkpoint": "a"}), 3)
    c = _keyed(Stage.wired(id="c", kind="use", params={}, inputs={"checkpoint": "b1"}), 4)
    report, reporter = _run(tmp_path, [a, b1, b2, c], _HandOff)
    assert set(report.outcomes) == {"a", "b1", "b2", "c"}
    assert [sid for sid, _ in reporter.lines] == ["a", "b2", "b1", "c"]  # b1 and b2 were out together
    assert report.outcomes["c"].result["from"] == {"checkpoint": "b1"}


def test_roles_that_are_not_the_runners_are_refused(tmp_path, kinds):
    a = _keyed(Stage(id="a", kind="source", params={}), 1)
    wrong = _keyed(Stage.wired(id="b", kind="use", params={}, inputs={"weights": "a"}), 2)
    with pytest.raises(StageError, match=r"planned with inputs \['weights'\], but use takes \['checkpoint'\]") as e:
        _run(tmp_path, [a, wrong])
    assert list(e.value.report.outcomes) == ["a"]  # what finished travels with the error


def test_status_is_its_plain_string():
    assert [s.value for s in Status] == ["cached", "built", "ran", "needs", "skipped"]
    assert json.dumps({"status": Status.NEEDS}) == '{"status": "needs"}'
    assert f"{Status.BUILT}" == "built" and Status("ran") is Status.RAN and Status.NEEDS == "needs"
    assert Status.NEEDS.not_built and Status.SKIPPED.not_built and not Status.CACHED.not_built


def test_report_lists_the_first_stage_of_each_chain_not_built():
    def outcome(sid, status, result):
        return Outcome(Stage(id=sid, kind="use", params={}), status, result, 0.0)

    report = Report({"a": outcome("a", Status.NEEDS, {"needs": ["x"]}),
                     "b": outcome("b", Status.NEEDS, {"needs": ["x"], "blocked_by": "a"}),
                     "c": outcome("c", Status.BUILT, {})})
    assert [o.stage.id for o in report.not_built()] == ["a"] and report.ran() == ["c"]


def test_roles_and_variant_stay_out_of_the_key():
    """The same digest as the pinned one (tests/cache/test_store.py) for a stage wired by role."""
    tools = {"torch": "2.13.0", "llmcompressor": "0.13.0"}
    plain = Stage(id="quantize/x", kind="quantize", params={"scheme": "FP8_DYNAMIC", "ignore": ["lm_head"]},
                  inputs=("fetch",), tools=("torch", "llmcompressor"), version=1)
    wired = Stage.wired(id="quantize/x", kind="quantize", params={"scheme": "FP8_DYNAMIC", "ignore": ["lm_head"]},
                        inputs={"checkpoint": "fetch"}, variant="x", tools=("torch", "llmcompressor"), version=1)
    assert wired.inputs == ("fetch",) and wired.roles == {"checkpoint": "fetch"} and wired.variant == "x"
    key = wired.compute_key({"fetch": "f" * 64}, tools)
    assert key == plain.compute_key({"fetch": "f" * 64}, tools)
    assert key == "c79699483a0d3e2c8b5afd5f2d90004d1d25244bbb4bde6fe4e61ca58099a733"
    late = Stage.wired(id="e", kind="trtllm_engine", params={}, inputs={"checkpoint": "q"}, after={"gate": "g"})
    assert late.inputs == ("q",) and late.after == ("g",) and late.roles == {"checkpoint": "q", "gate": "g"}
    assert late.compute_key({"q": "1" * 64, "g": "2" * 64}, {}) == late.compute_key({"q": "1" * 64, "g": "3" * 64}, {})


def test_every_runner_declares_its_inputs_and_result():
    import typing

    from pipeline.stages import VERSIONS, runner

    for kind in VERSIONS:
        module = runner(kind)
        assert typing.is_typeddict(module.Inputs) and typing.is_typeddict(module.Result), kind
        assert module.run.__annotations__["return"] == "Result", kind  # postponed: the name


def test_a_backend_that_declares_nothing_gets_the_standard_chain():
    from pipeline.backends import get_backend
    from pipeline.backends.base import Backend
    from pipeline.plan.build import CHAINS
    from pipeline.plan.gguf import gguf_stages
    from pipeline.plan.trtllm import trtllm_stages
    from pipeline.plan.variant_stages import standard_stages

    class Plain(Backend):
        name = "plain"
        distributions = ()
        extra = "plain"

    assert CHAINS[Plain.chain] is standard_stages
    assert CHAINS[get_backend("llamacpp").chain] is gguf_stages
    assert CHAINS[get_backend("modelopt").chain] is trtllm_stages
    assert not hasattr(Backend, "plan_stages") and not hasattr(Backend, "publish_params")


@pytest.mark.parametrize("chain", ["standard", "gguf", "trtllm"])
def test_every_planned_stage_gets_the_roles_its_runner_takes(tmp_path, tiny_model, tiny_smol, wikitext, chain):
    """Each chain's planner wires every stage with its runner's roles and names its variant."""
    from pipeline.plan.build import build_plan
    from pipeline.recipe.load import load_recipe
    from tests.backends.test_llamacpp import gguf_recipe
    from tests.backends.test_modelopt import modelopt_recipe
    from tests.conftest import write_recipe

    recipe = {
        "standard": lambda: write_recipe(tmp_path, tiny_model, wikitext),
        # a tokenizer llama.cpp's converter knows (planning asks it)
        "gguf": lambda: gguf_recipe(tmp_path, tiny_smol, wikitext, "- name: q4\n  backend: llamacpp\n  type: Q4_K_M\n"
                                    "- name: bf\n  backend: llamacpp\n  type: BF16\n"),
        "trtllm": lambda: modelopt_recipe(tmp_path, tiny_model, wikitext, "- name: x\n  backend: modelopt\n"
                                          "  qformat: fp8\n  engines: [{gpu: H100}]\n"),
    }[chain]()
    plan = build_plan(load_recipe(recipe))
    done = {s.id: Outcome(s, Status.RAN, {}, 0.0) for s in plan.stages}
    kinds = set()
    for stage in plan.stages:
        assert set(scheduler.assemble(stage, done)) == set(stage.roles), stage.id
        assert set(stage.roles.values()) == set(stage.inputs + stage.after), stage.id
        shared = stage.kind in ("fetch", "baseline", "gguf_convert", "gguf_fidelity", "gguf_imatrix")
        assert (stage.variant is None) == shared and (shared or stage.id.endswith(f"/{stage.variant}")
                                                       or stage.id.startswith(("engine/", "publish-engine/"))), stage.id
        kinds.add(stage.kind)
    expected = {"standard": {"quantize"}, "gguf": {"gguf_quantize", "gguf_imatrix", "gguf_speed", "gguf_fidelity"},
                "trtllm": {"trtllm_engine", "publish_engine"}}[chain]
    assert expected <= kinds



def test_a_gpu_build_keys_the_stages_that_compute_on_it_apart_from_a_cpu_build(tmp_path, tiny_smol, wikitext):
    """GPU and CPU builds round differently (bf16 vs fp32 compute): baseline, quantize and evaluate
    get keys per device class; llama.cpp's stages (CPU only), gates and publishes of the same
    inputs do not change, and CPU keys carry nothing new."""
    from pipeline.plan.build import build_plan
    from pipeline.recipe.load import load_recipe
    from tests.backends.test_llamacpp import gguf_recipe

    loaded = load_recipe(gguf_recipe(tmp_path, tiny_smol, wikitext, "- name: fp8\n  backend: llmcompressor\n"
                                     "  scheme: FP8_DYNAMIC\n- name: q8\n  backend: llamacpp\n  type: Q8_0\n"))
    store = CacheStore(tmp_path / "cache")  # plan-time checks (the converter's vocabulary) asked once
    cpu, gpu, other = (build_plan(loaded, store=store, device=d).by_id() for d in ("cpu", "cuda", "cuda:1"))
    assert all("compute" not in s.params for s in cpu.values())
    moved = {i for i in cpu if cpu[i].key != gpu[i].key}
    computing = {"baseline", "quantize/fp8", "evaluate/fp8"}
    assert computing <= moved
    # Whatever reads those (gates, publishes, GGUF scoring against the baseline) moves with them.
    assert {i for i in cpu if gpu[i].params.get("compute") == "cuda"} == computing
    assert cpu["fetch"].key == gpu["fetch"].key and cpu["quantize/q8"].key == gpu["quantize/q8"].key
    assert {i: s.key for i, s in gpu.items()} == {i: s.key for i, s in other.items()}


def test_with_a_cuda_llama_cpp_the_gguf_matrix_and_evaluation_are_planned_on_the_gpu(tmp_path, tiny_smol, wikitext,
                                                                                    monkeypatch):
    """``toolchain install --cuda``: on a GPU builder llama.cpp's importance matrix and each GGUF
    evaluation are keyed for the GPU (they run there); conversion, quantization and speed stay
    the CPU's."""
    from pipeline.plan.build import build_plan
    from pipeline.recipe.load import load_recipe
    from pipeline.toolchains import llamacpp
    from tests.backends.test_llamacpp import gguf_recipe

    monkeypatch.setattr(llamacpp, "built_with_cuda", lambda: True)
    loaded = load_recipe(gguf_recipe(tmp_path, tiny_smol, wikitext, "- name: q4\n  backend: llamacpp\n  type: Q4_K_M\n"))
    store = CacheStore(tmp_path / "cache")
    cpu, gpu = (build_plan(loaded, store=store, device=d).by_id() for d in ("cpu", "cuda"))
    assert all("compute" not in s.params for s in cpu.values())
    on_gpu = {i for i, s in gpu.items() if s.params.get("compute") == "cuda"}
    assert on_gpu == {"baseline", "evaluate/q4"} | {i for i in gpu if i.startswith("gguf/imatrix-")}
    assert len(on_gpu) == 3 and cpu["quantize/q4"].key != gpu["quantize/q4"].key  # its matrix moved
    assert cpu["gguf/convert-f16"].key == gpu["gguf/convert-f16"].key


def test_the_device_is_fixed_before_planning(monkeypatch):
    from pipeline import hardware
    from pipeline.errors import InputError
    from pipeline.quality.runner import compute_device

    # On a cluster a stage gets a GPU only under --device cuda: auto plans for the CPU.
    assert compute_device("auto", here=False) == "cpu"
    assert compute_device(" CUDA:1 ", here=False) == "cuda:1"
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        compute_device("tpu", here=False)
    # Here, with no GPU the driver reports, auto is the CPU (torch not consulted).
    monkeypatch.setattr(hardware, "gpu_architectures", lambda: ())
    assert compute_device("auto", here=True) == "cpu"

# -- peak memory per stage ----------------------------------------------------------------------

MB = 10**6


def _allocating(name: str, nbytes: int) -> ModuleType:
    """A stage kind that holds ``nbytes`` of touched memory while it runs."""
    module = ModuleType(name)

    def run(ctx, stage, got, out=None):
        held = b"\x01" * nbytes  # filled, so every page is resident
        return {"held": len(held)}

    module.run = run
    module.Inputs = _SourceInputs
    return module


@pytest.mark.skipif(not memory._LINUX or not memory._CLEAR_REFS.exists(), reason="needs Linux's /proc/self/clear_refs")
def test_each_built_stage_records_its_own_peak_memory(tmp_path, monkeypatch):
    """A stage that holds 400 MB peaks above that; a later one holding 40 MB peaks lower (the
    high-water mark is reset between stages). The figure is beside the entry's seconds, never in
    its result; the stage line and the run's JSON event show it."""
    table = {"big": _allocating("big", 400 * MB), "small": _allocating("small", 40 * MB),
             "verdict": _kind("verdict", _SourceInputs, {"passed": True})}
    monkeypatch.setattr(scheduler, "runner", table.__getitem__)
    big = _keyed(Stage(id="big", kind="big", params={}), 1)
    small = _keyed(Stage(id="small", kind="small", params={}, after=("big",)), 2)
    verdict = Stage(id="verdict", kind="verdict", params={}, cached=False, after=("small",))
    report, reporter = _run(tmp_path, [big, small, verdict])
    peaks = {sid: o.peak.process for sid, o in report.outcomes.items()}
    assert peaks["big"] >= 400 * MB
    assert peaks["small"] < peaks["big"] - 300 * MB
    assert peaks["verdict"] is not None  # uncached stages are measured too
    entry = report.outcomes["big"].entry
    assert entry.record["peak_rss_bytes"] == peaks["big"] and "peak_rss_bytes" not in entry.result
    assert reporter.peaks["big"] == peaks["big"] and reporter.peaks["verdict"] is None  # shown for builds

    from pipeline.run.report import stage_rows

    rows = {r["stage"]: r for r in stage_rows(report)}
    assert rows["big"]["peak_rss_bytes"] == peaks["big"] and rows["small"]["status"] == "built"
    again, _ = _run(tmp_path, [big, small, verdict])  # served from the cache: nothing measured
    assert again.outcomes["big"].status == Status.CACHED and again.outcomes["big"].peak is None


def test_no_figure_where_the_high_water_mark_cannot_be_reset(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    with memory.PeakMemory() as peak:
        held = b"\x01" * (10 * MB)
    assert len(held) and peak.process is None and "peak_rss_bytes" not in peak.record()


def test_a_child_process_s_peak_is_recorded_when_it_sets_a_new_maximum():
    import subprocess
    import sys

    grow = "b = b'\\x01' * {n}"
    with memory.PeakMemory() as first:
        subprocess.run([sys.executable, "-c", grow.format(n=600 * MB)], check=True)
    assert first.children is None or first.children >= 600 * MB  # None: an earlier child was larger
    with memory.PeakMemory() as second:
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert second.children is None  # smaller than an earlier child: unknown, so not reported


def test_stage_lines_show_a_build_s_peak_memory():
    import io

    from rich.console import Console

    from pipeline.progress import Reporter

    out = io.StringIO()
    reporter = Reporter(Console(file=out, width=200), mode="log")
    reporter.stage(1, 2, "gguf/convert", "done", 12.5, 2_345_000_000)
    reporter.stage(2, 2, "quantize/q", "done", 1.0)
    first, second = out.getvalue().splitlines()
    assert first.startswith("[1/2] gguf/convert: done 12.5s peak 2.35 GB") and "peak" not in second
    json_out = io.StringIO()
    Reporter(Console(file=json_out), mode="json").stage(1, 1, "baseline", "done", 3.0, 412_000_000)
    assert json.loads(json_out.getvalue())["peak_rss_bytes"] == 412_000_000
