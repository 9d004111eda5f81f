"""End to end on the real SmolLM2-135M-Instruct: the demo recipe, every vLLM format family, the
GGUF types and the ModelOpt formats for TensorRT-LLM (about 30 minutes on 2 CPU cores, run once for
the module), and the TensorRT-LLM engine recipe on a machine without a GPU builder."""

from __future__ import annotations

import json
import os
import shutil
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
    yield {"dirs": dirs, "first": first}
    # About 4 GB of cache and store: give the disk back to the modules that run after this one.
    shutil.rmtree(root, ignore_errors=True)


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


def _manifests(demo) -> dict[str, dict]:
    return {p.parent.parent.name: json.loads(p.read_text()) for p in demo["dirs"]["storage"].rglob("manifest.json")}


def test_demo_publishes_every_family_gated_and_verifiable(demo):
    manifests = _manifests(demo)
    assert set(manifests) == set(ALL) | set(GGUF) | set(MODELOPT)
    for name, manifest in manifests.items():
        assert manifest["gate"]["passed"], name
        assert manifest["source"]["kind"] == "gguf" and manifest["license"] == "apache-2.0"
        folder = demo["dirs"]["storage"] / "smollm2-135m-instruct" / name / manifest["version"]
        verify = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(folder)], cwd=REPO,
                                capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr
    m = manifests["fp8-dynamic"]["metrics"]
    # FP8 on this model measured PPL ratio 1.018, mean KLD 0.026, top-1 0.902 (8,176 tokens).
    assert 1.0 < m["ppl_ratio"] < 1.10 and 0.0 < m["mean_kld"] < 0.05 and m["top1"] > 0.85
    assert 20 < manifests["fp8-dynamic"]["baseline"]["ppl"] < 40


def test_quality_has_the_expected_shape(demo):
    """8-bit formats stay closest to the baseline, 4-bit weight-only next, FP4 W4A4 furthest."""
    kld = {n: m["metrics"]["mean_kld"] for n, m in _manifests(demo).items()}
    eight = ("fp8-dynamic", "fp8-static", "w8a8-sq-gptq", "w8a16")
    four = ("w4a16-gptq", "w4a16-awq", "nvfp4a16", "mxfp4a16")
    assert max(kld[n] for n in eight) < min(kld[n] for n in four)
    assert max(kld[n] for n in four) < kld["mxfp4"]
    assert kld["nvfp4a16"] < kld["nvfp4"]  # quantizing activations too costs quality


WEIGHT_ONLY = ("w8a16", "w4a16-gptq", "w4a16-awq", "nvfp4a16", "mxfp4a16")
ALL = ("fp8-dynamic", "fp8-static", "w8a8-sq-gptq", "nvfp4", "mxfp4") + WEIGHT_ONLY
MODELOPT = ("modelopt-fp8", "modelopt-fp8-kv-fp8", "modelopt-fp8-pc-pt", "modelopt-nvfp4", "modelopt-nvfp4-mlp-only",
            "modelopt-int4-awq", "modelopt-int8-sq")
GGUF = ("gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q6_k", "gguf-q5_k_m", "gguf-q4_k_m", "gguf-q4_k_m-no-imatrix",
        "gguf-q4_0", "gguf-iq4_xs", "gguf-q3_k_m", "gguf-q2_k")


def test_gguf_fidelity_and_ordering(demo):
    """The F16 conversion is near exact and tokenizes as the model does; KLD grows as bits shrink
    (llama.cpp's own Llama-3-8B ordering, on the types SmolLM2's shapes leave comparable), and the
    importance matrix helps at 4 bits."""
    manifests = _manifests(demo)
    fidelity = manifests["gguf-f16"]["fidelity"]
    assert fidelity["tokenizer"]["mismatches"] == 0 and fidelity["tokenizer"]["tokens"] > 250_000
    assert fidelity["f16_mean_kld"] <= 1e-3
    kld = {n: manifests[n]["metrics"]["mean_kld"] for n in GGUF}
    assert kld["gguf-f16"] < kld["gguf-q8_0"] < kld["gguf-q6_k"] < kld["gguf-q4_k_m"] < kld["gguf-q3_k_m"] < kld["gguf-q2_k"]
    assert kld["gguf-q4_k_m"] < kld["gguf-q4_k_m-no-imatrix"]
    for name in GGUF:
        speed = manifests[name]["speed"]
        assert speed["pp512_tps"] > 0 and speed["tg64_tps"] > 0 and speed["threads"] == 2 and speed["cpu_model"]
        assert sum(manifests[name]["gguf"]["tensor_types"].values()) == 272


@pytest.mark.parametrize("name", GGUF)
def test_gguf_variants_load_in_llama_cpp(demo, name):
    """Each published GGUF loads in llama-cpp-python and, from 4 bits up, still answers."""
    from pipeline.toolchains import llamacpp

    llama_cpp = llamacpp.import_bindings(llamacpp.find())
    manifest = _manifests(demo)[name]
    folder = demo["dirs"]["storage"] / "smollm2-135m-instruct" / name / manifest["version"]
    llm = llama_cpp.Llama(model_path=str(folder / manifest["gguf"]["files"][0]), n_ctx=256, n_threads=2, verbose=False)
    try:
        text = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    if name not in ("gguf-q3_k_m", "gguf-q2_k"):
        assert "Paris" in text, text


@pytest.mark.parametrize("name", ALL)
def test_published_variants_load_back_with_transformers(demo, name):
    """What vLLM loads, loaded through transformers' compressed-tensors integration (bf16, as
    served). Weight-only variants must agree with modelbuild's exact fp32 evaluation on most
    next tokens (bf16 rounding is the only difference); 8-bit ones must still answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.backends.llmcompressor import LLMCompressorBackend

    folder = next((demo["dirs"]["storage"] / "smollm2-135m-instruct" / name).iterdir())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = (REPO.parent / "shared/data/wikitext-2/test.txt").read_text()[:2000]
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        served = model(ids).logits.float()
    assert torch.isfinite(served).all()
    if name in WEIGHT_ONLY:
        with torch.no_grad():
            exact = LLMCompressorBackend().load_for_eval(folder, "cpu")(ids).logits
        assert (served.argmax(-1) == exact.argmax(-1)).float().mean().item() > 0.85
    if name in ("fp8-dynamic", "fp8-static", "w8a8-sq-gptq", "w8a16"):
        assert "Paris" in _greedy(model, tokenizer, "The capital of France is")


def test_rerun_is_a_no_op(demo):
    again = _modelbuild("run", str(DEMO), dirs=demo["dirs"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "running" not in again.stderr
    assert "already published" in again.stdout
    assert len(list(demo["dirs"]["storage"].rglob("manifest.json"))) == len(ALL) + len(GGUF) + len(MODELOPT)


def test_modelopt_variants_carry_engines_and_serving_profiles(demo):
    """Each ModelOpt checkpoint names only the engines that load it and has one trtllm-serve
    profile per target GPU that runs it (the demo targets L40S, H100 and B200, tp 1)."""
    manifests = _manifests(demo)
    profiles = {n: {g for p in manifests[n].get("serving_profiles", []) for g in p["gpus"]} for n in MODELOPT}
    assert profiles["modelopt-fp8"] == {"L40S", "H100", "B200"}
    assert profiles["modelopt-fp8-pc-pt"] == {"H100"}  # TensorRT-LLM's FP8 row-wise kernels: Hopper only
    assert profiles["modelopt-nvfp4"] == profiles["modelopt-nvfp4-mlp-only"] == {"B200"}
    assert profiles["modelopt-int4-awq"] == {"L40S", "H100"}  # W4A16 AWQ: not on Blackwell
    assert profiles["modelopt-int8-sq"] == set()  # served only through legacy TensorRT engines
    assert "vllm" not in manifests["modelopt-int4-awq"]["format"]["engines"]
    assert manifests["modelopt-int8-sq"]["format"]["engines"] == ["trtllm-engine"]
    for name in MODELOPT:
        folder = demo["dirs"]["storage"] / "smollm2-135m-instruct" / name / manifests[name]["version"]
        assert (folder / "hf_quant_config.json").is_file()
        for profile in manifests[name].get("serving_profiles", []):
            assert (folder / profile["options_file"]).is_file()


def test_modelopt_and_llmcompressor_agree_where_they_build_the_same_format(demo):
    """ModelOpt FP8 (per-tensor weights and static activations) lands near llm-compressor's FP8
    static; INT4 AWQ of both stays within the 4-bit band; the FP8 checkpoint still answers."""
    from transformers import AutoTokenizer

    from pipeline.backends.modelopt_checkpoint import load_exported

    kld = {n: m["metrics"]["mean_kld"] for n, m in _manifests(demo).items()}
    assert 0.5 < kld["modelopt-fp8"] / kld["fp8-static"] < 2.0
    assert kld["modelopt-int4-awq"] < 0.4 and kld["w4a16-awq"] < 0.4
    assert max(kld[n] for n in ("modelopt-fp8", "modelopt-fp8-pc-pt")) < min(kld[n] for n in ("modelopt-nvfp4", "modelopt-int4-awq"))
    folder = next((demo["dirs"]["storage"] / "smollm2-135m-instruct" / "modelopt-fp8").iterdir())
    model = load_exported(folder, "cpu")
    assert "Paris" in _greedy(model, AutoTokenizer.from_pretrained(folder), "The capital of France is")


def test_engine_recipe_plans_engines_and_reports_them_not_built(demo):
    """On this CPU machine the engine stages wait for a GPU builder: the checkpoint comes from the
    demo's cache, nothing is built as a placeholder, and run exits 6 (not 3, a gate failure)."""
    recipe = REPO / "recipes" / "smollm2-135m-instruct-trtllm-engines.yaml"
    plan = _modelbuild("plan", str(recipe), dirs=demo["dirs"])
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "engine/modelopt-fp8/sm90-tp1-pp1-b16-s4096: waiting for a GPU builder" in plan.stdout
    assert "engine/modelopt-fp8/sm89-tp1-pp1-b8-s2048: waiting for a GPU builder" in plan.stdout
    run = _modelbuild("run", str(recipe), dirs=demo["dirs"])
    assert run.returncode == 6, run.stderr[-2000:]
    assert "quantize/modelopt-fp8: running" not in run.stderr  # the demo's very checkpoint stage
    lines = [x for x in run.stderr.splitlines() if x.startswith("engine/modelopt-fp8/")]
    assert len(lines) == 2 and all("not built, needs an NVIDIA GPU of architecture" in x for x in lines)
    assert not list((demo["dirs"]["storage"] / "smollm2-135m-instruct").glob("modelopt-fp8-trtllm-*"))
