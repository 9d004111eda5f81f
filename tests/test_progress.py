"""The run's progress view: heartbeats off a terminal (an injected clock and timer, never sleeps),
JSON events, quiet mode, ETAs from recorded build times, library bars folded in, and GPTQ's
per-layer progress from a real llm-compressor run on the tiny model."""

from __future__ import annotations

import io
import json
import queue
import sys

import pytest
from rich.console import Console

from pipeline.cache.durations import INDEX, Durations
from pipeline.progress import PlannedStage, Reporter, interval_from_env, steps
from tests.backends.test_llmcompressor import _recipe


class FakeTimer:
    """The heartbeat thread's wait, driven by the test: each wait reports its timeout and blocks
    until the test advances the clock and releases it (``tick``) or ends the run (``stop``)."""

    def __init__(self):
        self.now = 0.0
        self.waits: queue.Queue[float] = queue.Queue()
        self._release: queue.Queue[bool] = queue.Queue()

    def clock(self) -> float:
        return self.now

    def wait(self, timeout: float) -> bool:
        self.waits.put(timeout)
        return self._release.get(timeout=60)

    def tick(self, seconds: float) -> float:
        """Let the thread's current wait end ``seconds`` later; returns its next wait's timeout
        (so the tick's output is complete when this returns)."""
        self.now += seconds
        self._release.put(False)
        return self.waits.get(timeout=60)

    def stop(self) -> None:
        self._release.put(True)


def _reporter(mode: str, timer: FakeTimer, interval: float = 30.0) -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter(Console(file=out, width=200), mode=mode, interval=interval, clock=timer.clock,
                    wait=timer.wait), out


PLAN = [PlannedStage("fetch", 0.0), PlannedStage("quantize/q", 120.0), PlannedStage("publish/q", 30.0)]


def test_heartbeat_off_a_terminal_at_the_interval_with_eta():
    timer = FakeTimer()
    reporter, out = _reporter("log", timer, interval=30)
    with reporter.run(PLAN):
        assert timer.waits.get(timeout=60) == 30  # the first beat is due one interval after the start
        reporter.stage(1, 3, "fetch", "cached")
        reporter.stage(2, 3, "quantize/q", "running")
        assert timer.tick(10) == 20  # a stage line carries the ETA: the next beat is due 30 s after it
        assert "…" not in out.getvalue()
        with steps("layers", 4) as advance:
            advance()
            assert timer.tick(20) == 30
            first = out.getvalue().splitlines()[-1]
            timer.now += 5  # a step advance is no ETA line: the beat stays due 30 s after the last one
            advance()
            assert timer.tick(25) == 30
            second = out.getvalue().splitlines()[-1]
        timer.stop()
    # The step began at t=10: 1 of 4 layers in 20 s, so 60 s more, then publish's recorded 30 s
    assert first == "[2/3] quantize/q … 30s in stage, layers 1/4 (run 30s, ETA 1m30s)"
    # 2 of 4 layers in 50 s: 50 s more, then publish's 30 s
    assert second == "[2/3] quantize/q … 1m00s in stage, layers 2/4 (run 1m00s, ETA 1m20s)"
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/3] fetch: cached (run 0s, ETA 2m30s)"
    assert "  layers: 1/4" in lines and "  layers: 2/4" in lines


def test_heartbeat_for_a_stage_without_a_start_line():
    """Uncached stages (publish) print no start line; the heartbeat names the next one due."""
    timer = FakeTimer()
    reporter, out = _reporter("log", timer, interval=5)
    with reporter.run(PLAN):
        timer.waits.get(timeout=60)
        reporter.stage(1, 3, "fetch", "cached")
        reporter.stage(2, 3, "quantize/q", "done", 3.0)
        timer.tick(6)
        timer.stop()
    assert out.getvalue().splitlines()[-1] == "[3/3] publish/q … 6s in stage (run 6s, ETA 24s)"


def test_interval_is_configurable(monkeypatch):
    monkeypatch.setenv("MODELBUILD_PROGRESS_INTERVAL", "7.5")
    assert interval_from_env() == 7.5 and Reporter(mode="log").interval == 7.5
    monkeypatch.setenv("MODELBUILD_PROGRESS_INTERVAL", "soon")
    assert interval_from_env() == 30.0


def test_json_events_parse_line_by_line():
    timer = FakeTimer()
    reporter, out = _reporter("json", timer)
    with reporter.run(PLAN):
        timer.waits.get(timeout=60)
        reporter.stage(1, 3, "fetch", "cached")
        reporter.stage(2, 3, "quantize/q", "running")
        with steps("layers", 2) as advance:
            advance()
            timer.tick(31)
            advance()
        reporter.stage(2, 3, "quantize/q", "done", 40.0)
        reporter.warn("scheme [x] is slow")
        timer.stop()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run" and kinds[-1] == "end" and "heartbeat" in kinds
    beat = next(e for e in events if e["event"] == "heartbeat")
    assert beat["stage"] == "quantize/q" and beat["index"] == 2 and beat["step_done"] == 1 and beat["eta_s"] > 0
    assert [(e["done"], e["total"]) for e in events if e["event"] == "step"] == [(0, 2), (1, 2), (2, 2)]
    assert {"event": "warning", "message": "scheme [x] is slow"} in events


def test_quiet_prints_warnings_only():
    timer = FakeTimer()
    reporter, out = _reporter("quiet", timer)
    with reporter.run(PLAN):
        reporter.stage(2, 3, "quantize/q", "running")
        with steps("layers", 2) as advance:
            advance(2)
        reporter.stage(2, 3, "quantize/q", "done", 1.0)
        reporter.warn("disk almost full")
    assert out.getvalue() == "warning: disk almost full\n"
    assert timer.waits.empty()  # no heartbeat thread at all


def test_library_bars_are_folded_not_interleaved():
    """A tqdm bar written during the run becomes the heartbeat's detail; other lines pass."""
    from tqdm import tqdm

    timer = FakeTimer()
    reporter, out = _reporter("log", timer)
    with reporter.run(PLAN):
        timer.waits.get(timeout=60)
        reporter.stage(2, 3, "quantize/q", "running")
        bar = tqdm(total=8, desc="Calibrating")  # tqdm resolves sys.stderr now: the fold
        bar.update(3)
        bar.refresh()
        print("UserWarning: something odd", file=sys.stderr)
        timer.tick(31)
        bar.close()
        timer.stop()
    text = out.getvalue()
    assert "%|" not in text and "it/s" not in text
    assert "UserWarning: something odd\n" in text
    assert "quantize/q … 31s in stage, Calibrating 3/8" in text
    assert sys.stderr is not None and not type(sys.stderr).__name__ == "_Fold"  # restored


def test_eta_from_recorded_costs(tmp_path):
    index = Durations(tmp_path)
    assert index.estimate("k1", "quantize", {"scheme": "W4A16"}) is None
    index.add("k1", "quantize", {"scheme": "W4A16"}, 100)
    index.add("k2", "quantize", {"scheme": "W4A16"}, 200)
    index.add("k3", "quantize", {"scheme": "FP8"}, 10)
    index.save()
    again = Durations(tmp_path)
    assert again.estimate("k1", "quantize", {"scheme": "W4A16"}) == 100  # the same key: its own time
    assert again.estimate("k9", "quantize", {"scheme": "W4A16"}) == 150  # the same work: the median
    assert again.estimate("k9", "quantize", {"scheme": "NVFP4"}) == 100  # the kind's median
    assert again.estimate("k9", "evaluate", {}) is None


def test_index_is_seeded_once_from_existing_entries(tmp_path):
    from pipeline.cache.store import CacheStore

    store = CacheStore(tmp_path)
    store.put("ab" * 32, lambda out: (out / "x").write_text("x") and {}, {"stage": "s", "kind": "baseline",
                                                                          "params": {"n": 1}})
    assert not (tmp_path / INDEX).exists()
    seeded = Durations(tmp_path)
    assert seeded.seeded and seeded.estimate("ab" * 32, "baseline", {"n": 1}) is not None
    assert seeded.estimate("cd" * 32, "baseline", {"n": 2}) is not None  # the kind's
    seeded.save()
    (tmp_path / "objects").rename(tmp_path / "elsewhere")  # the index alone answers from now on
    again = Durations(tmp_path)
    assert not again.seeded and again.estimate("ab" * 32, "baseline", {"n": 1}) is not None


@pytest.fixture(scope="module")
def gptq_recipe(tmp_path_factory, tiny_model, wikitext):
    root = tmp_path_factory.mktemp("progress")
    return _recipe(root, tiny_model, wikitext, {
        "w4-gptq": "scheme: W4A16\n    algorithm: gptq\n    group_size: 32",
        "w4-awq": "scheme: W4A16_ASYM\n    algorithm: awq\n    group_size: 32\n    awq: {n_grid: 3}",
        "w8-sq": "scheme: W8A8\n    smoothquant: {smoothing_strength: 0.5}",
    })


def test_gptq_reports_each_layer_and_the_cache_learns_its_cost(cli, gptq_recipe, dirs):
    code, _, err = cli("run", gptq_recipe, "--json-progress")
    assert code == 0, err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [line for line in err.splitlines() if not line.startswith("{")] == [
        line for line in err.splitlines() if line.startswith("reports: ")]  # nothing but events
    for variant in ("w4-gptq", "w4-awq", "w8-sq"):
        layers = [(e["done"], e["total"]) for e in events
                  if e["event"] == "step" and e["step"] == "layers" and e["stage"] == f"quantize/{variant}"]
        assert layers == [(0, 2), (1, 2), (2, 2)], variant  # the tiny model's 2 decoder layers, one by one
    ends = {e["stage"]: e for e in events if e["event"] == "stage" and e["status"] != "running"}
    assert ends["quantize/w4-gptq"]["status"] == "done" and ends["quantize/w4-gptq"]["seconds"] > 0
    kinds = json.loads((dirs["cache"] / INDEX).read_text())["kinds"]
    assert {"fetch", "baseline", "quantize", "evaluate", "gate", "publish"} <= set(kinds)

    code, _, err = cli("run", gptq_recipe, "--json-progress")  # all cached: nothing left to wait for
    assert code == 0, err
    start = json.loads(err.splitlines()[0])
    assert start["event"] == "run" and start["to_build"] == 6  # gates and publishing always run
    assert start["eta_s"] is not None and start["eta_s"] < ends["quantize/w4-gptq"]["seconds"] + 60

    code, out, err = cli("run", gptq_recipe, "--quiet")
    assert code == 0 and "w4-awq" in out
    assert not [line for line in err.splitlines() if line.strip() and not line.startswith("reports: ")], err


def test_gguf_conversion_and_quantization_report_their_progress(tmp_path, tiny_smol):
    """llama-quantize's tensors k/N as steps; the converter's own bar folded in, never printed."""
    from types import SimpleNamespace

    from pipeline.toolchains import gguf_reader, llamacpp_tools
    from pipeline.toolchains import llamacpp as toolchain

    try:
        toolchain.find()
    except Exception as e:  # noqa: BLE001 - the message says how to build it
        pytest.fail(f"{e} (bash .ci/setup builds it)")
    timer = FakeTimer()
    reporter, out = _reporter("json", timer)
    f16, q8 = tmp_path / "m-f16.gguf", tmp_path / "m-q8.gguf"
    variant = SimpleNamespace(type="Q8_0", tensor_types={}, output_type=None, token_embedding_type=None)
    with reporter.run([PlannedStage("gguf/convert", None), PlannedStage("quantize/q8", None)]):
        reporter.stage(1, 2, "gguf/convert", "running")
        llamacpp_tools.convert(tiny_smol, f16, "f16", {}, None)
        reporter.stage(1, 2, "gguf/convert", "done", 1.0)
        reporter.stage(2, 2, "quantize/q8", "running")
        llamacpp_tools.quantize(f16, q8, variant, imatrix_file=None, threads=2)
        timer.stop()
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    tensors = [(e["done"], e["total"]) for e in events if e["event"] == "step" and e["step"] == "tensors"]
    n = len(gguf_reader.tensor_types(f16))
    assert tensors[0] == (0, n) and tensors[-1] == (n, n) and len(tensors) == n + 1  # one event per tensor
    assert all(e["stage"] == "quantize/q8" for e in events if e["event"] == "step")
