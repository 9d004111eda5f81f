"""llama-bench's figures carry their spread and how busy other processes kept the machine; a busy
run is measured again and, if it never gets quiet, flagged (the load is injected: no test depends
on how busy this machine is)."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest

from pipeline import hardware
from pipeline.toolchains import llamacpp_tools

ROWS = [{"n_prompt": 32, "n_gen": 0, "samples_ts": [100.0, 90.0, 120.0], "cpu_info": "Test CPU", "backends": "CPU"},
        {"n_prompt": 0, "n_gen": 8, "samples_ts": [10.0, 12.0, 11.0], "cpu_info": "Test CPU", "backends": "CPU"}]


def test_other_cores_subtracts_this_process_and_its_children():
    # 10 s of wall time; the machine was busy 16 CPU-s, of which 12 were the benchmark's own.
    assert hardware.other_cores(100.0, 116.0, 5.0, 17.0, 10.0) == pytest.approx(0.4)
    # Counters ticking apart never make the others' load negative.
    assert hardware.other_cores(100.0, 110.0, 5.0, 15.5, 10.0) == 0.0
    assert hardware.other_cores(1.0, 2.0, 0.0, 0.0, 0.0) == 0.0


def test_this_machine_reports_busy_cpu_seconds():
    before = hardware.busy_cpu_seconds()
    sum(i * i for i in range(200_000))  # some work of this process's own
    after = hardware.busy_cpu_seconds()
    assert before is not None and after is not None and after >= before


@pytest.fixture
def bench(monkeypatch):
    """``llamacpp_tools.bench`` with llama-bench's output and the measured loads given: returns
    (bench, the loads still to hand out, the commands run)."""
    chain = SimpleNamespace(tool=lambda name: f"/bin/{name}", gpu_layers=lambda on: ["-ngl", "0"])
    monkeypatch.setattr(llamacpp_tools.toolchain, "find", lambda: chain)
    loads: list[float | None] = []
    runs: list[list[str]] = []

    def measured(cmd):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, json.dumps(ROWS), ""), loads.pop(0)

    monkeypatch.setattr(llamacpp_tools, "_measured", measured)

    def call():
        return llamacpp_tools.bench("m.gguf", threads=2, prompt_tokens=32, gen_tokens=8, repetitions=3)

    return call, loads, runs


def test_a_quiet_run_is_measured_once_with_median_and_range(bench):
    call, loads, runs = bench
    loads.append(0.05)
    out = call()
    assert len(runs) == 1
    assert out["pp32_tps"] == 100.0 and out["pp32_tps_range"] == [90.0, 120.0]
    assert out["tg8_tps"] == 11.0 and out["tg8_tps_range"] == [10.0, 12.0]
    assert out["load"] == {"other_cores": 0.05, "attempts": 1, "busy": False, "busy_above_cores": hardware.BUSY_CORES}


def test_a_busy_run_is_repeated_until_quiet(bench):
    call, loads, runs = bench
    loads.extend([1.2, 0.1])
    out = call()
    assert len(runs) == 2 and out["load"]["attempts"] == 2 and out["load"]["other_cores"] == 0.1
    assert out["load"]["busy"] is False


def test_a_machine_that_stays_busy_is_flagged_with_the_quietest_attempt(bench):
    call, loads, runs = bench
    loads.extend([1.5, 0.9, 1.1])
    out = call()
    assert len(runs) == llamacpp_tools.BENCH_ATTEMPTS == 3
    assert out["load"] == {"other_cores": 0.9, "attempts": 3, "busy": True, "busy_above_cores": hardware.BUSY_CORES}


def test_an_unknown_load_is_recorded_as_unknown(bench):
    call, loads, runs = bench
    loads.append(None)
    out = call()
    assert len(runs) == 1 and out["load"]["other_cores"] is None and out["load"]["busy"] is False
