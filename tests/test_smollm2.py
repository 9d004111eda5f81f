"""End to end on the real SmolLM2-135M-Instruct (the demo recipe): minutes on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

DEMO = REPO / "recipes" / "smollm2-135m-instruct.yaml"


def _modelbuild(*args: str, dirs: dict[str, Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--cache-dir", str(dirs["cache"]), "--storage", str(dirs["storage"])],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    dirs = {"cache": root / "cache", "storage": root / "store"}
    first = _modelbuild("run", str(DEMO), dirs=dirs)
    assert first.returncode == 0, first.stderr[-3000:]
    [version] = sorted(p.parent for p in dirs["storage"].rglob("manifest.json"))
    return {"dirs": dirs, "first": first, "version": version}


def _greedy(model, tokenizer, prompt: str, n: int = 8) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_gguf_import_is_the_real_model(demo):
    """The bf16 checkpoint imported from the GGUF answers like SmolLM2-135M-Instruct."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fetch = next(p for p in (demo["dirs"]["cache"] / "objects").glob("*/*")
                 if json.loads((p / "entry.json").read_text())["describe"]["stage"] == "fetch")
    config = json.loads((fetch / "data" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(fetch / "data", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(fetch / "data")
    assert "Paris" in _greedy(model, tokenizer, "The capital of France is")


def test_demo_publishes_gated_fp8_with_verifiable_manifest(demo):
    manifest = json.loads((demo["version"] / "manifest.json").read_text())
    m = manifest["metrics"]
    # FP8 on this model measured PPL ratio 1.018, mean KLD 0.026, top-1 0.902 (8,176 tokens).
    assert 1.0 < m["ppl_ratio"] < 1.10
    assert 0.0 < m["mean_kld"] < 0.06
    assert m["top1"] > 0.85
    assert 20 < manifest["baseline"]["ppl"] < 40
    assert manifest["source"]["kind"] == "gguf" and len(manifest["source"]["sha256"]) == 64
    assert manifest["license"] == "apache-2.0"
    verify = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(demo["version"])],
                            cwd=REPO, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


def test_published_fp8_loads_back_with_transformers(demo):
    """What vLLM would load: the compressed-tensors checkpoint, through transformers here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo["version"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo["version"])
    assert "Paris" in _greedy(model, tokenizer, "The capital of France is")


def test_rerun_is_a_no_op(demo):
    again = _modelbuild("run", str(DEMO), dirs=demo["dirs"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "running" not in again.stderr
    assert "already published" in again.stdout
    assert len(list(demo["dirs"]["storage"].rglob("manifest.json"))) == 1
