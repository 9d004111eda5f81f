"""End to end on the real SmolLM2-135M-Instruct: the demo recipe, every vLLM format family, the
GGUF types and the ModelOpt formats for TensorRT-LLM (about 30 minutes on 2 CPU cores, run once for
the module), and the TensorRT-LLM engine recipe on a machine without a GPU builder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, WIKITEXT

pytestmark = pytest.mark.slow

DEMO = REPO / "recipes" / "smollm2-135m-instruct.yaml"


def _modelbuild(*args: str, dirs: dict[str, Path]) -> subprocess.CompletedProcess:
    # As in a CI log: stderr is a pipe. Heartbeats every 10 s, so "at least every 30 s" holds with
    # room for a heartbeat thread woken late on a busy machine.
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--cache-dir", str(dirs["cache"]), "--storage", str(dirs["storage"])],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MODELBUILD_PROGRESS_INTERVAL": "10"},
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


def _run_seconds(line: str) -> int | None:
    """The run's elapsed time a progress line carries (``(run 4m02s, ETA …)``)."""
    m = re.search(r"\(run (?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?[,)]", line)
    if not m or not any(m.groups()):
        return None
    h, mi, sec = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + sec


def test_demo_log_shows_progress_with_eta_at_least_every_30s_and_gptq_layers(demo):
    lines = demo["first"].stderr.splitlines()
    stamps = [t for t in map(_run_seconds, lines) if t is not None]
    assert len(stamps) > 100 and all("ETA" in line for line in lines if _run_seconds(line) is not None)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) <= 30, max(gaps)
    # Inside a GPTQ quantization: layer k/L of SmolLM2's 30 decoder layers, as the library goes.
    assert any(re.search(r"layers:? \d+/30", line) for line in lines)
    assert not any("it/s]" in line for line in lines)  # library bars are folded, not interleaved


def _version(demo, variant: str) -> Path:
    """The one published version folder of a demo variant."""
    [folder] = [p for p in (demo["dirs"]["storage"] / "smollm2-135m-instruct" / variant).iterdir()
                if (p / "manifest.json").is_file()]
    return folder


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
ALL = ("fp8-dynamic", "fp8-dynamic-kv-fp8", "fp8-static", "w8a8-sq-gptq", "nvfp4", "mxfp4") + WEIGHT_ONLY
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


def test_kv_cache_quantization_is_measured_for_both_engines(demo):
    """An FP8 KV cache on llm-compressor's FP8 (measured: mean KLD 0.0261 -> 0.0320) and llama.cpp's
    q8_0 and q4_0 caches on Q4_K_M (+0.0004 and +0.0366), each with the engine's serving flags."""
    manifests = _manifests(demo)
    plain, kv = manifests["fp8-dynamic"], manifests["fp8-dynamic-kv-fp8"]
    assert kv["format"]["kv_cache"] == "fp8" and plain["format"]["kv_cache"] == "16-bit"
    assert 0 < kv["metrics"]["mean_kld"] - plain["metrics"]["mean_kld"] < 0.02
    assert {p["options"]["kv-cache-dtype"] for p in kv["serving_profiles"]} == {"fp8"}
    assert {p["options"]["kv-cache-dtype"] for p in plain["serving_profiles"]} == {"auto"}
    q4km = manifests["gguf-q4_k_m"]
    cost = {kind: figures["added_mean_kld"] for kind, figures in q4km["kv_cache"].items()}
    assert 0 < cost["q8_0"] < 0.005 < cost["q4_0"] < 0.1, cost
    names = {p["name"] for p in q4km["serving_profiles"]}
    assert {"llamacpp-q4_k_m-cpu-kv-q8_0", "llamacpp-q4_k_m-cpu-kv-q4_0"} <= names


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

    folder = _version(demo, name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = (WIKITEXT / "test.txt").read_text()[:2000]
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
    profile per target GPU that runs it (the demo targets L40S, H100 and B200, tp 1), and a
    `vllm serve` profile where vLLM loads the format."""
    manifests = _manifests(demo)
    profiles = {n: {g for p in manifests[n].get("serving_profiles", []) if p["engine"] == "trtllm" for g in p["gpus"]}
                for n in MODELOPT}
    vllm = {n: {g for p in manifests[n].get("serving_profiles", []) if p["engine"] == "vllm" for g in p["gpus"]}
            for n in MODELOPT}
    assert vllm["modelopt-fp8"] == vllm["modelopt-fp8-pc-pt"] == {"L40S", "H100", "B200"}
    assert vllm["modelopt-nvfp4"] == {"B200"} and vllm["modelopt-int4-awq"] == set()
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
        assert not any("{" in p["command"] for p in manifests[name].get("serving_profiles", []))


def test_modelopt_and_llmcompressor_agree_where_they_build_the_same_format(demo):
    """ModelOpt FP8 (per-tensor weights and static activations) lands near llm-compressor's FP8
    static; INT4 AWQ of both stays within the 4-bit band; the FP8 checkpoint still answers."""
    from transformers import AutoTokenizer

    from pipeline.backends.modelopt_checkpoint import load_exported

    kld = {n: m["metrics"]["mean_kld"] for n, m in _manifests(demo).items()}
    assert 0.5 < kld["modelopt-fp8"] / kld["fp8-static"] < 2.0
    assert kld["modelopt-int4-awq"] < 0.4 and kld["w4a16-awq"] < 0.4
    # Same algorithm, not the same grid: ModelOpt's INT4 is symmetric, llm-compressor's W4A16 AWQ
    # asymmetric (a zero point per group), which SmolLM2's Q4_1-born weights favour (measured 1.6x).
    assert 1.0 < kld["modelopt-int4-awq"] / kld["w4a16-awq"] < 2.5
    assert max(kld[n] for n in ("modelopt-fp8", "modelopt-fp8-pc-pt")) < min(kld[n] for n in ("modelopt-nvfp4", "modelopt-int4-awq"))
    folder = _version(demo, "modelopt-fp8")
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
    assert "engine/modelopt-int8-sq/sm90-tp1-pp1-b16-s4096: waiting for a GPU builder" in plan.stdout
    run = _modelbuild("run", str(recipe), dirs=demo["dirs"])
    assert run.returncode == 6, run.stderr[-2000:]
    for variant in ("modelopt-fp8", "modelopt-int8-sq"):  # the demo's very checkpoint stages
        assert f"quantize/{variant}: running" not in run.stderr
    lines = [x for x in run.stderr.splitlines() if x.startswith("engine/modelopt-")]
    assert len(lines) == 3 and all("not built, needs an NVIDIA GPU of architecture" in x for x in lines)
    assert not list((demo["dirs"]["storage"] / "smollm2-135m-instruct").glob("modelopt-*-trtllm-*"))


def _store_cli(*args: str, dirs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args, "--storage", str(dirs["storage"])],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(params=["filesystem", "s3"])
def gguf_store(request, demo, tmp_path) -> dict:
    """The demo's store, or a loopback S3 bucket that the demo's GGUF Q4_K_M is published to by a
    run of the demo recipe cut to that variant (every stage but publish comes from the cache)."""
    if request.param == "filesystem":
        return demo["dirs"]
    import boto3
    import yaml

    endpoint = request.getfixturevalue("s3_endpoint")
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="demo-gguf")
    data = yaml.safe_load(DEMO.read_text())
    data["variants"] = [v for v in data["variants"] if v["name"] == "gguf-q4_k_m"]
    assert data["variants"]
    for section, key in (("calibration", "path"), ("eval", "corpus")):
        data[section][key] = str((DEMO.parent / data[section][key]).resolve())
    recipe = tmp_path / "q4.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    dirs = {"cache": demo["dirs"]["cache"], "storage": "s3://demo-gguf/models"}
    run = _modelbuild("run", str(recipe), dirs=dirs)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "quantize/gguf-q4_k_m: running" not in run.stderr
    return dirs


def test_llamacpp_variant_selected_pulled_and_served(gguf_store, tmp_path):
    """A serving replica's path, for real, from a filesystem store and from S3: select the best
    GGUF for a CPU, pull it with verification, start llama.cpp's own OpenAI-compatible server
    with the published profile's arguments on loopback, ask for a completion, stop it."""
    import socket
    import time
    import urllib.request

    from pipeline.toolchains.llamacpp import find

    dirs = gguf_store
    chosen = _store_cli("select", "--engine", "llamacpp", "--gpu", "cpu", "--json", dirs=dirs)
    assert chosen.returncode == 0, chosen.stderr
    entry = json.loads(chosen.stdout)
    assert entry["engines"] == ["llamacpp"]
    dest = tmp_path / "replica"
    pulled = _store_cli("pull", entry["ref"], str(dest), dirs=dirs)
    assert pulled.returncode == 0, pulled.stderr
    assert _store_cli("verify", str(dest), dirs=dirs).returncode == 0
    manifest = json.loads((dest / "manifest.json").read_text())
    [profile] = [p for p in manifest["serving_profiles"] if p["name"].endswith("-cpu")]
    argv = profile["command"].replace(entry["path"], str(dest)).split()
    assert argv[0] == "llama-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(find().tool("llama-server")), *argv[1:]]
    argv[argv.index("--host") + 1], argv[argv.index("--port") + 1] = "127.0.0.1", str(port)
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read()[-2000:]
            assert time.time() < deadline, "llama-server did not become ready"
            time.sleep(0.5)
        body = json.dumps({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        text = answer["choices"][0]["text"]
        assert text.strip(), answer
        if entry["metrics"]["mean_kld"] < 0.05:  # near-lossless (the demo store's best): answers like the model
            assert "Paris" in text, text
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            served = json.loads(r.read())
        assert any(manifest["gguf"]["files"][0] in m["id"] for m in served["data"]), served
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_demo_store_lists_selects_and_deploys(demo, tmp_path):
    """The consumer commands on the demo's real store: every published version is indexed with
    its measured KLD; select honours engine, GPU and size; deploy writes a compose file for it."""
    dirs = demo["dirs"]
    listed = json.loads(_store_cli("list", "--json", dirs=dirs).stdout)
    assert len(listed) == len(_manifests(demo)) and all(e["metrics"]["mean_kld"] >= 0 for e in listed)
    fp8_l40s = json.loads(_store_cli("select", "--engine", "vllm", "--gpu", "L40S", "--json", dirs=dirs).stdout)
    assert fp8_l40s["min_compute_capability"] <= 8.9 and "vllm" in fp8_l40s["engines"]
    small = _store_cli("select", "--engine", "vllm", "--gpu", "A100", "--max-gb", "0.13", "--json", dirs=dirs)
    assert small.returncode == 0, small.stderr
    assert json.loads(small.stdout)["size_bytes"] <= 0.13e9 and json.loads(small.stdout)["weight_bits"] == 4
    assert _store_cli("deploy", fp8_l40s["ref"], str(tmp_path / "d"), "--engine", "vllm", dirs=dirs).returncode == 0
    assert "vllm/vllm-openai" in (tmp_path / "d" / "docker-compose.yml").read_text()


def test_deploy_example_is_what_deploy_generates_from_the_demo(demo, tmp_path):
    """deploy/example is regenerated from the demo's registry and matches, but for the version
    (a timestamp) and the store's path on this machine."""
    import re

    out = tmp_path / "example"
    done = _store_cli("deploy", "smollm2-135m-instruct/gguf-q4_k_m", str(out), "--replicas", "3",
                      "--cpus-per-replica", "2", "--mount-from", "/mnt/models", dirs=demo["dirs"])
    assert done.returncode == 0, done.stderr

    def normal(text: str) -> list[str]:
        text = re.sub(r"\d{8}T\d{6}Z-[0-9a-f]{12}", "VERSION", text)
        return [line for line in text.splitlines() if not line.startswith("# Generated by")]

    for name in ("docker-compose.yml", "nginx.conf"):
        assert normal((out / name).read_text()) == normal((REPO / "deploy" / "example" / name).read_text()), name


def test_demo_report_shows_every_variant_with_measured_figures(demo, tmp_path):
    """The demo's tradeoff report: every published variant with measured quality and size, CPU
    speed for the GGUF files and an estimate on the recipe's GPUs for every other one, both Pareto
    plots, a most faithful and a fastest pick per declared target; every published variant
    carries a model card with valid front matter."""
    from huggingface_hub import ModelCard

    out = tmp_path / "report"
    done = _store_cli("report", str(DEMO), "--out", str(out), dirs=demo["dirs"])
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "report.json").read_text())
    manifests = _manifests(demo)
    assert sorted(r["variant"] for r in data["rows"]) == sorted(manifests)
    for row in data["rows"]:
        assert row["metrics"]["mean_kld"] is not None and row["size_bytes"] > 0, row["variant"]
        gguf = row["variant"].startswith("gguf-")
        assert (row["speed"] is not None) == gguf, row["variant"]
        if gguf:
            assert row["speed"]["tg_range"][0] <= row["speed"]["tg_tps"] <= row["speed"]["tg_range"][1]
            assert row["speed"]["load"]["other_cores"] is not None, row["variant"]
        else:  # every recipe GPU the format runs on, each with a decode figure
            cc = {"T4": 7.5, "L40S": 8.9, "H100": 9.0, "B200": 10.0}
            runs = {g for g, c in cc.items() if c >= manifests[row["variant"]]["format"]["min_compute_capability"]}
            assert row["estimates"] and set(row["estimates"]) <= runs, row["variant"]
            assert all(e["decode_tps"] > 0 and e["kind"] == "estimate" for e in row["estimates"].values())
    assert {"size_vs_kld.png", "speed_vs_kld.png"} <= {p.name for p in out.iterdir()}
    # On H100 the fastest within mean KLD 0.05 computes in 8 bits (FP8 or INT8 matmuls, 8-bit
    # weights), not a weight-only format, whatever the most faithful pick is.
    h100 = next(r for r in data["recommendations"] if r["target"] == "vLLM on H100")
    assert manifests[h100["fastest"]]["format"]["compute"] in ("fp8", "int8"), h100
    assert manifests[h100["fastest"]]["metrics"]["mean_kld"] <= 0.05, h100
    recs = {r["target"]: r["variant"] for r in data["recommendations"]}
    assert len(recs) == 4 and all(recs.values()), recs
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows[recs["llama.cpp on CPU (≤ 0.11 GB)"]]["size_bytes"] <= 0.11e9
    for name, manifest in manifests.items():
        folder = demo["dirs"]["storage"] / "smollm2-135m-instruct" / name / manifest["version"]
        card = ModelCard((folder / "README.md").read_text()).data.to_dict()
        assert card["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and card["license"] == "apache-2.0"
        assert card["base_model_relation"] == "quantized" and card["tags"], name
