"""Checks that need hardware or network this CI machine lacks; they skip here, and run where
CUDA (``gpu``) or a model hub (``network``, with MODELBUILD_TEST_NETWORK=1) is available."""

from __future__ import annotations

import json

import pytest


@pytest.mark.gpu
def test_cuda_evaluation_matches_cpu(cli, recipe_factory, dirs, tmp_path):
    """The same recipe evaluated on a GPU gives the CPU's metrics (fp32 both; kernels differ)."""
    recipe = recipe_factory()
    assert cli("run", recipe, "--device", "cpu")[0] == 0
    gpu_dirs = ["--cache-dir", str(tmp_path / "gpu-cache"), "--storage", str(tmp_path / "gpu-store")]
    code, _, err = cli("run", recipe, "--device", "cuda", *gpu_dirs)
    assert code == 0, err
    cpu = json.loads(next(dirs["storage"].rglob("manifest.json")).read_text())
    gpu = json.loads(next((tmp_path / "gpu-store").rglob("manifest.json")).read_text())
    assert gpu["evaluation"]["device"] == "cuda"
    for metric in ("ppl", "mean_kld", "top1"):
        assert gpu["metrics"][metric] == pytest.approx(cpu["metrics"][metric], rel=0.02, abs=1e-3)


@pytest.mark.network
def test_hub_revision_resolves_to_a_commit():
    from pipeline.sources import hub

    class Source:
        kind, repo, revision, allow_pickle, trust_remote_code = "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", "main", False, False

    resolved = hub.resolve(Source())
    assert len(resolved.identity["commit"]) == 40
