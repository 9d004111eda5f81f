"""Host-memory models: sizes read from safetensors headers, the need of each model, the host's
memory (cgroup limits included), and a stage that cannot fit refused before it starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks._common import cgroup_unavailable
from pipeline import memory
from tests.conftest import REPO

NO_CGROUP = cgroup_unavailable()


@pytest.fixture
def checkpoint(tmp_path):
    """Two files: an embedding (the largest tensor) and two decoder layers of unequal size."""
    import torch
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(1000, 64, dtype=torch.bfloat16)},
              str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"model.layers.0.mlp.weight": torch.zeros(64, 100, dtype=torch.bfloat16),
               "model.layers.1.mlp.weight": torch.zeros(64, 300, dtype=torch.bfloat16),
               "model.layers.1.mlp.weight_scale": torch.zeros(64, dtype=torch.float32),
               "model.norm.weight": torch.zeros(64, dtype=torch.float32)},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    return tmp_path


def test_sizes_come_from_the_headers(checkpoint):
    facts = memory.tensors(checkpoint)
    assert facts.values == 64_000 + 6_400 + 19_200 + 64 + 64
    assert facts.stored_bytes == 2 * (64_000 + 6_400 + 19_200) + 4 * (64 + 64)
    assert facts.largest_tensor == 64_000
    assert facts.largest_layer == 19_200 + 64  # layer 1, its scale included
    assert facts.largest_file == max(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    assert facts.largest_hessians == 300**2  # layer 1's matrix takes 300 inputs (layer 0's: 100)
    assert facts.vocab == 1000  # the embedding's rows
    assert memory.tensors(checkpoint / "missing") is None


def test_each_model_needs_what_it_holds(checkpoint):
    facts = memory.tensors(checkpoint)
    runtime = memory.RUNTIME_BYTES
    assert memory.need("streamed", facts) == runtime + int(1.1 * 4 * 64_000)
    # scoring windows of 16 tokens adds their logits (three copies of 16 x 1000 values)
    assert memory.need("streamed", facts, 16) == runtime + int(1.1 * 4 * (64_000 + 3 * 16 * 1000))
    assert memory.need("whole-fp32", facts, 16) == runtime + int(1.1 * 4 * (facts.values + 3 * 16 * 1000))
    assert memory.need("layered", facts) == runtime + int(1.1 * (facts.stored_bytes + 4 * (2 * (19_200 + 64) + 300**2)))
    assert memory.need("whole-fp32", facts) == runtime + int(1.1 * 4 * facts.values)
    assert memory.need("whole-stored", facts) == runtime + int(1.1 * facts.stored_bytes)
    assert memory.need("shard", facts) == runtime + 2 * facts.largest_file
    with pytest.raises(ValueError, match="unknown memory model"):
        memory.need("everything", facts)


def test_shortfall_names_the_stage_the_need_and_the_host(checkpoint, monkeypatch):
    monkeypatch.setattr(memory, "host_memory", lambda: (2 * 10**9, "physical memory"))
    assert memory.shortfall("whole-fp32", checkpoint, "quantize/w4a16") is None
    monkeypatch.setattr(memory, "host_memory", lambda: (5 * 10**8, "its memory cgroup's limit"))
    line = memory.shortfall("whole-fp32", checkpoint, "quantize/w4a16")
    assert line == ("≈ 0.6 GB of host memory for quantize/w4a16 (the whole model in fp32); this machine has "
                    "0.5 GB (its memory cgroup's limit)")
    assert memory.shortfall(None, checkpoint, "gguf/convert-f16") is None  # no model declared
    assert memory.shortfall("streamed", checkpoint / "missing", "baseline") is None  # not safetensors


@pytest.mark.skipif(bool(NO_CGROUP), reason=f"no memory cgroup can be made here: {NO_CGROUP}")
def test_host_memory_is_the_cgroup_limit_inside_one():
    from benchmarks._common import MemoryCgroup

    cgroup = MemoryCgroup(3 << 30)
    assert cgroup.enforced, cgroup.reason
    code = "import json; from pipeline.memory import host_memory; print(json.dumps(host_memory()))"
    with cgroup:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              preexec_fn=cgroup.join, check=True)
    assert json.loads(done.stdout) == [3 << 30, "its memory cgroup's limit"]
    outside = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(outside.stdout)[0] > 3 << 30


def test_a_stage_that_cannot_fit_is_not_started(cli, recipe_factory, dirs, monkeypatch):
    """The baseline needs more than the host has: it is reported with the shortfall (exit 6), its
    dependents wait, nothing is cached for it and nothing is published; the fetch is kept."""
    monkeypatch.setattr(memory, "host_memory", lambda: (10**6, "physical memory"))
    code, _, err = cli("run", recipe_factory())
    assert code == 6, err
    assert "baseline: not built, needs ≈ " in err
    assert "GB of host memory for baseline (one layer at a time in fp32); this machine has 0.0 GB (physical memory)" in err
    assert not list(dirs["storage"].rglob("manifest.json"))
    entries = [json.loads(p.read_text())["describe"]["stage"] for p in dirs["cache"].rglob("entry.json")]
    assert "fetch" in entries and "baseline" not in entries


def test_plan_says_which_stages_will_not_fit(cli, recipe_factory, monkeypatch):
    """Planning reads the local source's tensor sizes: stages that cannot fit are named with the
    shortfall before anything runs."""
    monkeypatch.setattr(memory, "host_memory", lambda: (10**6, "physical memory"))
    code, out, err = cli("plan", recipe_factory())
    assert code == 0, err
    assert "baseline: will not start here, needs ≈ " in out
    assert "one layer at a time in fp32); this machine has 0.0 GB (physical memory)" in out
    monkeypatch.setattr(memory, "host_memory", lambda: (10**12, "physical memory"))
    code, out, err = cli("plan", recipe_factory())
    assert code == 0 and "will not start here" not in out
