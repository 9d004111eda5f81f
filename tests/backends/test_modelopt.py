"""ModelOpt formats for TensorRT-LLM on the tiny model: quantize, export, score the exported files,
serving profiles, legacy engine stages (planned, never faked), and the bad inputs."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_tokenizer, one_line, run_once, write_recipe

# name -> (variant options, expected quant_algo, engines that load it, targets given a profile)
VARIANTS = {
    "mo-fp8": ("qformat: fp8", "FP8", ["trtllm", "vllm", "trtllm-engine"], {"H100", "B200"}),
    "mo-fp8-kv": ("qformat: fp8\n    kv_cache_qformat: fp8", "FP8", ["trtllm", "vllm", "trtllm-engine"], {"H100", "B200"}),
    "mo-fp8-pc-pt": ("qformat: fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN", ["trtllm", "vllm", "trtllm-engine"], {"H100"}),
    "mo-nvfp4": ("qformat: nvfp4", "NVFP4", ["trtllm", "vllm", "trtllm-engine"], {"B200"}),
    "mo-nvfp4-mlp": ("qformat: nvfp4_mlp_only", "NVFP4", ["trtllm", "vllm", "trtllm-engine"], {"B200"}),
    "mo-awq": ("qformat: int4_awq\n    awq_block_size: 32\n    awq_alpha_step: 0.5", "W4A16_AWQ",
               ["trtllm", "trtllm-engine"], {"H100"}),
    "mo-sq": ("qformat: int8_sq", "W8A8_SQ_PER_CHANNEL", ["trtllm-engine"], set()),
}
TARGETS = "targets:\n  - {gpu: H100, tp: 2}\n  - {gpu: B200, tp: 4, max_batch_size: 128}\n"
# TorchLlmArgs keys the profiles may use (TensorRT-LLM's LLM API).
LLM_ARGS = {"tensor_parallel_size", "pipeline_parallel_size", "max_batch_size", "max_num_tokens", "max_seq_len",
            "kv_cache_config", "cuda_graph_config"}


def modelopt_recipe(folder: Path, model: Path, wikitext: Path, variants: str, *, targets: str = TARGETS,
                    gate: str = "max_kld: 10.0") -> Path:
    path = write_recipe(folder, model, wikitext, gate=gate)
    text = path.read_text()
    head = text[: text.index("variants:")]
    cal = "calibration:\n  path: " + str(wikitext / "valid.txt") + "\n"
    head = head.replace(cal, cal + "  samples: 4\n  seq_len: 64\n")
    path.write_text(head + targets + "variants:\n" + textwrap.indent(textwrap.dedent(variants), "  "))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model, wikitext):
    """One run of every ModelOpt format (module-scoped: each path once)."""
    root = tmp_path_factory.mktemp("modelopt")
    body = "".join(f"- name: {n}\n  backend: modelopt\n  {opts.replace(chr(10) + '    ', chr(10) + '  ')}\n"
                   for n, (opts, *_r) in VARIANTS.items())
    return run_once(root, modelopt_recipe(root, tiny_model, wikitext, body))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_format_is_exported_gated_and_published(built, name):
    from pipeline.storage.manifest import verify_folder

    _opts, algo, engines, profiled = VARIANTS[name]
    folder = built["published"][name]
    manifest = json.loads((folder / "manifest.json").read_text())
    hf_quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == algo
    assert hf_quant["kv_cache_quant_algo"] == ("FP8" if name == "mo-fp8-kv" else None)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "modelopt"
    assert manifest["format"]["format"] == "modelopt-hf" and manifest["format"]["engines"] == engines
    # Only engines that load the file get a serve command; INT8 SmoothQuant has none (engines only).
    assert sorted(manifest["serve"]) == sorted(e for e in engines if e != "trtllm-engine")
    assert manifest["gate"]["passed"] and manifest["metrics"]["ppl"] > 0
    assert (manifest["data"]["calibration"] is None) == (name == "mo-fp8-pc-pt")
    assert "dequantized exactly" in manifest["evaluation"]["method"]
    assert ("KV cache: FP8" in manifest["evaluation"]["method"]) == (name == "mo-fp8-kv")
    assert manifest["tools"]["nvidia-modelopt"] not in ("", "not-installed")
    assert {g for p in manifest.get("serving_profiles", []) if p["engine"] == "trtllm" for g in p["gpus"]} == profiled
    assert verify_folder(folder) == []
    # What the export leaves unquantized keeps the source's dtype (bf16), as on a GPU.
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"


def test_serving_profiles_are_trtllm_serve_commands_with_valid_options(built):
    folder = built["published"]["mo-fp8-kv"]
    profiles = {p["name"]: p for p in json.loads((folder / "manifest.json").read_text())["serving_profiles"]
                if p["engine"] == "trtllm"}
    assert set(profiles) == {"trtllm-fp8-tp2", "trtllm-fp8-tp4"}
    tp4 = profiles["trtllm-fp8-tp4"]
    assert tp4["gpus"] == ["B200"] and tp4["tp"] == 4
    options = yaml.safe_load((folder / tp4["options_file"]).read_text())
    assert set(options) <= LLM_ARGS
    assert options["tensor_parallel_size"] == 4 and options["max_batch_size"] == 128
    assert options["kv_cache_config"] == {"dtype": "fp8", "free_gpu_memory_fraction": 0.9}
    cmd = tp4["command"].split()
    assert cmd[:2] == ["trtllm-serve", str(folder)] and cmd[cmd.index("--backend") + 1] == "pytorch"
    assert cmd[cmd.index("--tp_size") + 1] == "4"
    assert cmd[cmd.index("--extra_llm_api_options") + 1] == str(folder / "serving" / "trtllm-fp8-tp4.yaml")
    plain = json.loads((built["published"]["mo-fp8"] / "manifest.json").read_text())["serving_profiles"]
    assert all(p["options"]["kv_cache_config"]["dtype"] == "auto" for p in plain if p["engine"] == "trtllm")


def test_vllm_profiles_for_modelopt_fp8_with_vllm_serve_options(built):
    """vLLM loads ModelOpt FP8: a `vllm serve --config` file per shape, KV dtype carried over."""
    folder = built["published"]["mo-fp8-kv"]
    profiles = {p["name"]: p for p in json.loads((folder / "manifest.json").read_text())["serving_profiles"]
                if p["engine"] == "vllm"}
    assert set(profiles) == {"vllm-fp8-fp8_kv-tp2", "vllm-fp8-fp8_kv-tp4"}
    tp4 = profiles["vllm-fp8-fp8_kv-tp4"]
    options = yaml.safe_load((folder / tp4["options_file"]).read_text())
    assert options["tensor-parallel-size"] == 4 and options["kv-cache-dtype"] == "fp8"
    assert options["max-num-seqs"] == 128
    assert tp4["command"] == f"vllm serve {folder} --config {folder}/serving/vllm-fp8-fp8_kv-tp4.yaml"


def test_exported_checkpoint_is_scored_with_its_scales(built):
    """The CPU evaluation dequantizes the stored tensors: plain transformers loading of the same
    FP8 files (which ignores the scales) gives different logits, ours match ModelOpt's own
    dequantization of every weight."""
    import torch
    from safetensors.torch import load_file

    from pipeline.backends.modelopt_checkpoint import load_exported

    folder = built["published"]["mo-fp8"]
    model = load_exported(folder, "cpu")
    assert model.modelbuild_simulated_layers == 14  # 2 layers x 7 projections, lm_head excluded
    state = load_file(str(folder / "model.safetensors"))
    stored = state["model.layers.0.mlp.down_proj.weight"].float() * state["model.layers.0.mlp.down_proj.weight_scale"]
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, stored)
    sq = load_exported(built["published"]["mo-sq"], "cpu")
    assert sq.modelbuild_simulated_layers == 14



@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_exported_checkpoint_is_scored_a_layer_at_a_time_as_from_memory(built, name, tmp_path):
    """The evaluation reads the export a module at a time (decoder layers, embeddings, head on meta
    until the pass reaches them) and computes the logits of the whole dequantized model."""
    import torch

    from pipeline.backends.modelopt import ModelOptBackend
    from pipeline.backends.modelopt_checkpoint import load_exported, load_streamed
    from pipeline.quality.streamed import streamed_logprobs

    folder = built["published"][name]
    windows = torch.randint(3, 512, (3, 40), generator=torch.Generator().manual_seed(0))
    model, _weights = load_streamed(folder, "cpu", tmp_path)
    kept = {n for n, p in model.named_parameters() if p.device.type != "meta"}
    assert kept and all(".layers." not in n and "embed" not in n and "lm_head" not in n for n in kept)
    whole = load_exported(folder, "cpu")
    assert model.modelbuild_simulated_layers == whole.modelbuild_simulated_layers
    streamed = list(ModelOptBackend().scores(folder, windows, "cpu", tmp_path))
    reference = list(streamed_logprobs(whole, windows, "cpu"))
    for (a, ids_a), (b, ids_b) in zip(streamed, reference, strict=True):
        assert torch.equal(ids_a, ids_b)
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), (a - b).abs().max()

def test_engine_stage_is_planned_and_reported_not_built_without_a_gpu(cli, dirs, tmp_path, tiny_model, wikitext):
    recipe = modelopt_recipe(tmp_path, tiny_model, wikitext, """\
        - name: mo-fp8
          backend: modelopt
          qformat: fp8
          engines:
            - {gpu: H100, tp: 2, max_batch_size: 4, max_seq_len: 512, max_input_len: 256}
        """)
    code, out, _err = cli("plan", recipe)
    assert code == 0
    assert "engine/mo-fp8/sm90-tp2-pp1-b4-s512" in out and "waiting for a GPU builder" in out
    code, out, err = cli("run", recipe)
    assert code == 6, err  # distinct from a gate failure (3)
    line = next(x for x in err.splitlines() if x.startswith("engine/mo-fp8/"))
    assert "not built, needs an NVIDIA GPU of architecture sm90" in line and "modelbuild run" in line
    store = dirs["storage"] / "tiny"
    assert [p.name for p in store.iterdir()] == ["mo-fp8"]  # the checkpoint only: no placeholder engine
    assert not list((dirs["cache"] / "objects").rglob("engine"))


def test_builder_without_tensorrt_llm_is_named(cli, dirs, tmp_path, tiny_model, wikitext, monkeypatch):
    """On a machine with the right GPU but no TensorRT-LLM, the engine is not built and the missing
    piece is named (this Python has no tensorrt_llm)."""
    from pipeline import hardware

    monkeypatch.setattr(hardware, "gpu_architectures", lambda: ("sm90",))
    recipe = modelopt_recipe(tmp_path, tiny_model, wikitext, """\
        - name: mo-fp8
          backend: modelopt
          qformat: fp8
          engines: [{gpu: H100}]
        """)
    code, _out, err = cli("run", recipe)
    assert code == 6
    line = next(x for x in err.splitlines() if x.startswith("engine/mo-fp8/"))
    assert "TensorRT-LLM importable by" in line and "sm90" not in line.split("needs", 1)[1].split(";")[0]


# A stand-in for TensorRT-LLM's Python on a GPU builder: the same module names and calls the build
# script uses (``tensorrt_llm._tensorrt_engine.LLM``, ``llmapi.BuildConfig``, ``torch.cuda``), which
# record what they were asked and write marked files instead of engines. It tests modelbuild's side
# of the build (arguments, checks, the engine manifest, publishing), not TensorRT-LLM: the real
# build needs an NVIDIA GPU and is never faked outside this test.
STANDIN = {
    "tensorrt/__init__.py": '__version__ = "10.0.0-standin"\n',
    "tensorrt_llm/__init__.py": '__version__ = "1.0.0-standin"\n',
    "tensorrt_llm/llmapi.py": "class BuildConfig:\n    def __init__(self, **kw):\n        self.kw = kw\n",
    "tensorrt_llm/_tensorrt_engine.py": """\
import json, pathlib
class LLM:
    def __init__(self, model, tensor_parallel_size, pipeline_parallel_size, build_config):
        self.asked = {"model": model, "tp": tensor_parallel_size, "pp": pipeline_parallel_size, **build_config.kw}
    def save(self, path):
        out = pathlib.Path(path)
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"standin": True, **self.asked}))
        for rank in range(self.asked["tp"] * self.asked["pp"]):
            (out / f"rank{rank}.engine").write_bytes(b"stand-in, not an engine")
    def shutdown(self):
        pass
""",
    "torch/__init__.py": """\
import os
class cuda:
    get_device_capability = staticmethod(lambda i: tuple(map(int, os.environ["STANDIN_CC"].split("."))))
    get_device_name = staticmethod(lambda i: "stand-in H100")
""",
}


@pytest.fixture
def standin_builder(tmp_path, monkeypatch):
    from pipeline import hardware

    root = tmp_path / "standin"
    for rel, text in STANDIN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    python = tmp_path / "trtllm-python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={root} exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setenv("MODELBUILD_TRTLLM_PYTHON", str(python))
    monkeypatch.setattr(hardware, "gpu_architectures", lambda: ("sm90",))
    monkeypatch.setenv("STANDIN_CC", "9.0")
    return python


ENGINE_RECIPE = """\
    - name: mo-fp8
      backend: modelopt
      qformat: fp8
      engines:
        - {gpu: H100, tp: 2, max_batch_size: 4, max_seq_len: 512, max_input_len: 256}
    """


def test_engine_built_on_a_builder_is_published_with_what_it_is_tied_to(cli, dirs, tmp_path, tiny_model, wikitext,
                                                                       standin_builder):
    code, _out, err = cli("run", modelopt_recipe(tmp_path, tiny_model, wikitext, ENGINE_RECIPE))
    assert code == 0, err
    store = dirs["storage"] / "tiny"
    [engine_variant] = [p for p in store.iterdir() if p.name != "mo-fp8"]
    assert engine_variant.name.startswith("mo-fp8-trtllm-sm90-tp2")
    [version] = [p for p in engine_variant.iterdir() if p.name != "channels" and not p.name.startswith(".")]
    manifest = json.loads((version / "manifest.json").read_text())
    facts = manifest["engine"]
    assert facts["sm"] == "sm90" and facts["gpu"] == "stand-in H100"
    assert facts["tensorrt_llm"] == "1.0.0-standin" and facts["tensorrt"] == "10.0.0-standin"
    assert (facts["tp"], facts["pp"]) == (2, 1) and facts["engine_files"] == ["rank0.engine", "rank1.engine"]
    assert facts["limits"] == {"max_batch_size": 4, "max_input_len": 256, "max_seq_len": 512,
                               "max_num_tokens": facts["limits"]["max_num_tokens"]}
    assert facts["build_command"].startswith(str(standin_builder)) and "--tp 2" in facts["build_command"]
    assert manifest["format"]["format"] == "tensorrt-llm-engine" and manifest["format"]["engines"] == ["trtllm-engine"]
    assert "--tp_size 2" in manifest["format"]["serve"]["trtllm-engine"]
    assert manifest["built_from"]["variant"] == "mo-fp8"
    asked = json.loads((version / "config.json").read_text())  # what the build script passed TensorRT-LLM
    assert asked["model"].endswith("/data") and (asked["tp"], asked["pp"], asked["max_batch_size"]) == (2, 1, 4)
    assert (asked["max_input_len"], asked["max_seq_len"]) == (256, 512)
    assert sorted(f["path"] for f in manifest["files"]) == ["config.json", "rank0.engine", "rank1.engine"]


def test_engine_built_on_another_architecture_is_refused(cli, dirs, tmp_path, tiny_model, wikitext, standin_builder,
                                                         monkeypatch):
    """The builder's GPU turns out to be an sm89 (nvidia-smi and torch disagree, or a mixed machine):
    an engine for the wrong architecture is never published."""
    monkeypatch.setenv("STANDIN_CC", "8.9")
    code, _out, err = cli("run", modelopt_recipe(tmp_path, tiny_model, wikitext, ENGINE_RECIPE))
    assert code != 0 and "engine built on sm89 (stand-in H100), but the stage is for sm90" in err
    assert [p.name for p in (dirs["storage"] / "tiny").iterdir()] == ["mo-fp8"]


def test_compute_capabilities_from_nvidia_smi():
    from pipeline.hardware import missing, parse_compute_caps

    assert parse_compute_caps("9.0\n9.0\n") == ["sm90", "sm90"]
    assert parse_compute_caps("12.0\n8.9\n") == ["sm120", "sm89"]
    assert parse_compute_caps("") == []
    assert missing(("gpu:sm100",))[0].startswith("an NVIDIA GPU of architecture sm100 (B200, GB200)")


BAD = {
    "unknown qformat": ("- name: x\n  backend: modelopt\n  qformat: fp6\n", TARGETS, "validate", 2,
                        "qformat"),
    "tp does not divide heads": ("- name: x\n  backend: modelopt\n  qformat: fp8\n", "targets:\n  - {gpu: H100, tp: 3}\n",
                                 "plan", 2, "tp 3 does not divide the model's 4 attention heads"),
    "nvfp4 on hopper only": ("- name: x\n  backend: modelopt\n  qformat: nvfp4\n", "targets:\n  - {gpu: H100}\n",
                             "plan", 2, "trtllm: compute capability 10+"),
    "fp8 on ampere only": ("- name: x\n  backend: modelopt\n  qformat: fp8\n", "targets:\n  - {gpu: A100}\n",
                           "plan", 2, "compute capability 8.9+, but the targets are A100 (8)"),
    "awq on blackwell only": ("- name: x\n  backend: modelopt\n  qformat: int4_awq\n  awq_block_size: 32\n",
                              "targets:\n  - {gpu: B200}\n", "plan", 2, "compute capability 8 to below 10"),
    "awq block does not divide": ("- name: x\n  backend: modelopt\n  qformat: int4_awq\n", "", "plan", 2,
                                  "AWQ block size 128 does not divide"),
    "pp exceeds layers": ("- name: x\n  backend: modelopt\n  qformat: fp8\n", "targets:\n  - {gpu: H100, pp: 3}\n",
                          "plan", 2, "pp 3 exceeds the model's 2 layers"),
    "engine tp does not divide heads": ("- name: x\n  backend: modelopt\n  qformat: fp8\n  engines: [{gpu: H100, tp: 3}]\n",
                                        "", "plan", 2, "engines.0.tp"),
    "engine gpu cannot run format": ("- name: x\n  backend: modelopt\n  qformat: nvfp4\n  engines: [{gpu: H100}]\n",
                                     "", "plan", 2, "a TensorRT-LLM engine for H100 cannot run NVFP4"),
    "unknown engine gpu": ("- name: x\n  backend: modelopt\n  qformat: fp8\n  engines: [{gpu: H900}]\n", "",
                           "validate", 2, "unknown GPU 'H900'"),
    "awq options on fp8": ("- name: x\n  backend: modelopt\n  qformat: fp8\n  awq_block_size: 64\n", "", "validate", 2,
                           "awq_block_size and awq_alpha_step apply to qformat int4_awq"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(cli, dirs, tmp_path, tiny_model, wikitext, case):
    variants, targets, command, code, expected = BAD[case]
    recipe = modelopt_recipe(tmp_path, tiny_model, wikitext, variants, targets=targets)
    got, out, err = cli(command, recipe)
    assert got == code, (out, err)
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and expected in lines[0], err
    assert not dirs["storage"].exists() or not any(dirs["storage"].rglob("manifest.json"))


def test_architecture_modelopt_cannot_export(cli, dirs, tmp_path, wikitext, tiny_model):
    """GPT-NeoX is not among the model families ModelOpt's exporter knows: refused at plan time."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = tmp_path / "neox"
    config = GPTNeoXConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).to(torch.bfloat16).save_pretrained(model)
    copy_tokenizer(tiny_model, model)
    recipe = modelopt_recipe(tmp_path, model, wikitext, "- name: x\n  backend: modelopt\n  qformat: fp8\n", targets="")
    code, _out, err = cli("plan", recipe)
    line = one_line(err)
    assert code == 2 and "cannot export architecture GPTNeoXForCausalLM" in line and "variants.0.qformat" in line


def test_format_missing_from_the_installed_modelopt(cli, dirs, tmp_path, tiny_model, wikitext, monkeypatch):
    """A ModelOpt older than the format (its preset config absent): refused at plan time, naming the
    formats this ModelOpt has."""
    import modelopt.torch.quantization as mtq

    from pipeline.backends.modelopt import QFORMATS

    monkeypatch.delattr(mtq, QFORMATS["nvfp4"]["preset"])
    recipe = modelopt_recipe(tmp_path, tiny_model, wikitext, "- name: x\n  backend: modelopt\n  qformat: nvfp4\n",
                             targets="targets:\n  - {gpu: B200}\n")
    code, _out, err = cli("plan", recipe)
    line = one_line(err)
    assert code == 2 and "qformat nvfp4" in line and "is not in the installed ModelOpt" in line
    assert "choose one of fp8" in line and "nvfp4," not in line


def test_tensor_parallel_must_split_or_replicate_kv_heads():
    """Grouped-query attention: 24 heads over 8 KV heads splits 4 ways (2 KV heads each), and 8
    ways; 3 ways divides the heads but neither splits nor replicates the KV heads."""
    from types import SimpleNamespace

    from pipeline.hardware import check_parallelism

    gqa = SimpleNamespace(num_attention_heads=24, num_key_value_heads=8, num_hidden_layers=28)
    assert check_parallelism(4, 1, gqa) is None and check_parallelism(8, 1, gqa) is None
    assert check_parallelism(3, 1, gqa) == "tp 3 neither divides the model's 8 KV heads nor is a multiple of them"
    assert check_parallelism(24, 1, gqa) is None  # KV heads replicated 3 times
    assert check_parallelism(1, 29, gqa) == "pp 29 exceeds the model's 28 layers"


def test_gpu_placement_is_one_gpu_when_it_holds_the_model_else_every_visible_gpu(tiny_model):
    """On a GPU builder ModelOpt gets the whole model: on the requested GPU when its free memory
    holds the checkpoint with headroom, else (``--device cuda``) spread by accelerate over every
    visible GPU within their free memory; a pinned GPU or all GPUs too small: one line."""
    from pipeline import memory
    from pipeline.backends import modelopt as mo
    from pipeline.errors import StageError

    needed = mo.GPU_HEADROOM * memory.tensors(tiny_model).stored_bytes
    assert mo._placement(tiny_model, "cpu") == {}
    assert mo._placement(tiny_model, "cuda", free={0: int(needed) + 1, 1: 0}) == {"device_map": {"": 0}}
    assert mo._placement(tiny_model, "cuda:1", free={0: 0, 1: int(needed) + 1}) == {"device_map": {"": 1}}
    half = int(needed * 0.6)
    assert mo._placement(tiny_model, "cuda", free={0: half, 1: half}) == {
        "device_map": "auto", "max_memory": {0: int(half / mo.GPU_HEADROOM), 1: int(half / mo.GPU_HEADROOM)}}
    with pytest.raises(StageError) as pinned:
        mo._placement(tiny_model, "cuda:0", free={0: half, 1: half})
    assert "GPU 0 have" in str(pinned.value) and "--device cuda" in pinned.value.fix
    with pytest.raises(StageError) as small:
        mo._placement(tiny_model, "cuda", free={0: half // 2, 1: half // 2})
    assert f"≈ {needed / 1e9:.1f} GB of GPU memory" in str(small.value) and "2 GPUs" in str(small.value)


@pytest.mark.gpu
def test_model_larger_than_one_gpu_is_calibrated_over_two_and_exports_the_same_bytes(tiny_model, tmp_path,
                                                                                     monkeypatch):
    """Two visible GPUs, each reported too small for the model: ModelOpt calibrates it spread
    over both (accelerate's device map) and exports what one GPU exports, bit for bit (the same
    bf16 arithmetic layer by layer; never run yet on two GPUs)."""
    import torch
    from safetensors.torch import load_file

    from pipeline import memory
    from pipeline.backends import modelopt as mo

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    variant = mo.ModelOptVariant(name="x", backend="modelopt", qformat="fp8")
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(3, 512, (64,), generator=g).tolist() for _ in range(4)]
    backend = mo.ModelOptBackend()
    one = backend.quantize(variant, tiny_model, tmp_path / "one", calibration=calibration, device="cuda")
    assert one["devices"] == ["cuda:0"]
    half = int(0.6 * mo.GPU_HEADROOM * memory.tensors(tiny_model).stored_bytes)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (half, 10 * half))
    two = backend.quantize(variant, tiny_model, tmp_path / "two", calibration=calibration, device="cuda")
    assert two["devices"] == ["cuda:0", "cuda:1"]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.mark.gpu
def test_exported_fp8_on_gpu_matches_cpu_evaluation(built):
    """On a CUDA machine: the exported FP8 checkpoint loaded on the GPU gives the CPU
    evaluation's logits (same dequantized weights, same simulated activations)."""
    import torch

    from pipeline.backends.modelopt_checkpoint import load_exported

    folder = built["published"]["mo-fp8"]
    ids = torch.arange(1, 65)[None]
    with torch.no_grad():
        cpu = load_exported(folder, "cpu")(ids).logits
        gpu = load_exported(folder, "cuda")(ids.cuda()).logits.cpu()
    assert torch.allclose(cpu, gpu, atol=2e-2, rtol=1e-2)



@pytest.mark.parametrize("opts", [{"qformat": "fp8"}, {"qformat": "fp8", "kv_cache_qformat": "fp8"},
                                  {"qformat": "fp8_pc_pt"}, {"qformat": "nvfp4"}, {"qformat": "nvfp4_mlp_only"},
                                  {"qformat": "int4_awq", "awq_block_size": 32, "awq_alpha_step": 0.5},
                                  {"qformat": "int8_sq"}], ids=lambda o: "+".join(map(str, o.values())))
@pytest.mark.parametrize("fits", [False, True], ids=["layer-at-a-time", "whole-fp32"])
def test_layer_at_a_time_calibration_exports_what_the_fp32_model_exports(tmp_path, tiny_model, opts, fits,
                                                                        monkeypatch):
    """The model held in bf16 and calibrated one layer at a time in fp32 (ModelOpt's layerwise
    mode, used when the fp32 model would not fit the host) writes the tensors of ModelOpt's flow on
    the model loaded whole in fp32, bit for bit; so does the whole-fp32 path used when it fits."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.backends import modelopt as mo

    monkeypatch.setattr(mo, "_whole_fp32_fits", lambda source: fits)
    took = []
    decoder_layers = mo._decoder_layers
    monkeypatch.setattr(mo, "_decoder_layers", lambda model: took.append(1) or decoder_layers(model))

    variant = mo.ModelOptVariant(name="x", backend="modelopt", **opts)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (64, 17, 48, 64)]
    if not variant.needs_calibration():
        calibration = None
    mo.ModelOptBackend().quantize(variant, tiny_model, tmp_path / "layered", calibration=calibration, device="cpu")

    mtq = mo._import_modelopt()
    from modelopt.torch.export import export_hf_checkpoint

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad(), mo._quiet_library_logs():
        mtq.quantize(model, mo.quant_config(variant), forward_loop=None if calibration is None else (
            lambda m: [m(torch.tensor([ids])) for ids in calibration]))
        model.to(torch.bfloat16)
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(tmp_path / "whole"))
    ours, reference = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("layered", "whole"))
    assert ours.keys() == reference.keys()
    different = [k for k in ours if ours[k].dtype != reference[k].dtype
                 or not torch.equal(ours[k].reshape(-1).view(torch.uint8), reference[k].reshape(-1).view(torch.uint8))]
    assert not different, different[:5]
    assert bool(took) == (calibration is not None and not fits)  # the path under test was taken

@pytest.mark.parametrize("fmt", ["fp8", "fp8_pc_pt", "int8_sq", "int4_awq", "nvfp4"])
def test_dequantization_inverts_modelopts_export_packing(fmt):
    """Each stored layout, written by ModelOpt's own ``to_quantized_weight``, dequantizes to the
    exact fake-quantized weight (scale * round(w / scale) on each format's grid)."""
    import torch
    from modelopt.torch.export.quant_utils import to_quantized_weight
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from pipeline.backends.modelopt_checkpoint import dequantize_weight
    from pipeline.backends.simulated_activations import round_to_fp4

    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.05
    scale_2 = None
    algo = {"fp8": "FP8", "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN", "int8_sq": "W8A8_SQ_PER_CHANNEL",
            "int4_awq": "W4A16_AWQ", "nvfp4": "NVFP4"}[fmt]
    block = None
    if fmt == "fp8":
        scale = w.abs().amax() / 448
        expected = (w / scale).to(torch.float8_e4m3fn).float() * scale
    elif fmt == "fp8_pc_pt":
        scale = w.abs().amax(dim=1) / 448
        expected = (w / scale[:, None]).to(torch.float8_e4m3fn).float() * scale[:, None]
    elif fmt == "int8_sq":
        scale = w.abs().amax(dim=1) / 127
        expected = (w / scale[:, None]).round().clamp(-128, 127) * scale[:, None]
    elif fmt == "int4_awq":
        block = 16
        scale = w.unflatten(1, (-1, block)).abs().amax(-1) / 7
        per = scale.repeat_interleave(block, dim=1)
        expected = (w / per).round().clamp(-8, 7) * per
    else:
        block = 16
        scale_2 = NVFP4QTensor.get_weights_scaling_factor_2(w)
        scale, _ = NVFP4QTensor.get_weights_scaling_factor(w, block, scale_2)
        per = (scale.float() * scale_2).repeat_interleave(block, dim=1)
        expected = round_to_fp4(w / per) * per
    stored = to_quantized_weight(w, scale, fmt, scale_2, block)
    got = dequantize_weight(stored, scale, scale_2, algo, block)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_nvfp4_activation_simulation_is_modelopts_arithmetic():
    import torch
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    from pipeline.backends.modelopt_checkpoint import nvfp4_qdq

    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * 3
    x[0, 0, :16] = 0  # an all-zero block
    global_scale = x.abs().amax() / (6 * 448) * 0.7  # calibrated on other text: some values clip
    q, block_scale, _ = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=global_scale)
    reference = q.dequantize(torch.float32, scale=block_scale, double_scale=global_scale, block_sizes={-1: 16})
    assert torch.equal(nvfp4_qdq(x, global_scale), reference)


def test_gate_change_does_not_rebuild_an_engine(tmp_path, tiny_model, wikitext):
    """An engine waits for its checkpoint's gate but is keyed by the checkpoint only."""
    from pipeline.progress import Reporter
    from pipeline.run.orchestrate import prepare

    keys = []
    for gate in ("max_kld: 10.0", "max_kld: 5.0"):
        folder = tmp_path / gate.split()[-1]
        folder.mkdir()
        recipe = modelopt_recipe(folder, tiny_model, wikitext, "- name: x\n  backend: modelopt\n  qformat: fp8\n"
                                 "  engines: [{gpu: H100}]\n", gate=gate)
        plan = prepare(recipe, cache_dir=tmp_path / "cache", storage=tmp_path / "store", reporter=Reporter()).plan
        keys.append({s.id: s.key for s in plan.stages})
    assert keys[0]["gate/x"] != keys[1]["gate/x"]
    assert keys[0]["engine/x/sm90-tp1-pp1-b8-s2048"] == keys[1]["engine/x/sm90-tp1-pp1-b8-s2048"]
