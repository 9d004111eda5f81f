"""Every llm-compressor scheme and algorithm on the tiny model: build, evaluate, publish, reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_once, write_recipe

# name -> variant options (YAML lines under the variant). The tiny model's layers take 64 and
# 128 input features, so group sizes are 32 (SmolLM2's 576 would need 64 or 32 too).
VARIANTS = {
    "fp8-static": "scheme: FP8",
    "w8a8-sq-gptq": "scheme: W8A8\n    algorithm: gptq\n    smoothquant: {smoothing_strength: 0.5}",
    "w8a16": "scheme: W8A16\n    group_size: 32",
    "w4a16-gptq": "scheme: W4A16\n    algorithm: gptq\n    group_size: 32\n    gptq: {actorder: static, dampening_frac: 0.05}",
    "w4a16-awq": "scheme: W4A16_ASYM\n    algorithm: awq\n    group_size: 32\n    awq: {n_grid: 3}",
    "nvfp4a16": "scheme: NVFP4A16",
    "nvfp4": "scheme: NVFP4\n    calibration: {samples: 4}",
    "mxfp4a16": "scheme: MXFP4A16",
    "mxfp4": "scheme: MXFP4",
    "fp8-dynamic-kv-fp8": "scheme: FP8_DYNAMIC\n    kv_cache_scheme: fp8",
}
MIN_CC = {"fp8-static": 8.9, "w8a8-sq-gptq": 7.5, "w8a16": 7.5, "w4a16-gptq": 7.5, "w4a16-awq": 7.5,
          "nvfp4a16": 10.0, "nvfp4": 10.0, "mxfp4a16": 10.0, "mxfp4": 10.0, "fp8-dynamic-kv-fp8": 8.9}


def _recipe(folder: Path, model: Path, wikitext: Path, variants: dict[str, str], extra: str = "") -> Path:
    body = "".join(f"  - name: {n}\n    backend: llmcompressor\n    {opts}\n" for n, opts in variants.items())
    path = write_recipe(folder, model, wikitext, gate="max_kld: 10.0", extra=extra)
    text = path.read_text()
    head = text[: text.index("variants:")]
    tail = text[text.index("variants:"):].split("\n", 1)[1]
    tail = tail[tail.index("\n", tail.index("scheme: FP8_DYNAMIC")) + 1:]
    path.write_text(head + "variants:\n" + body + tail)
    cal = "calibration:\n  path: " + str(wikitext / "valid.txt") + "\n"
    path.write_text(path.read_text().replace(cal, cal + "  samples: 8\n  seq_len: 64\n"))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model, wikitext):
    """One run building every variant (each path once; module-scoped to keep CI short)."""
    root = tmp_path_factory.mktemp("schemes")
    return run_once(root, _recipe(root, tiny_model, wikitext, VARIANTS))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_is_published_with_its_format(built, name):
    folder = built["published"][name]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"]["format"] == "compressed-tensors"
    assert manifest["format"]["min_compute_capability"] == MIN_CC[name]
    assert manifest["format"]["engines"] == ["vllm"]
    assert manifest["quantization"] == {"device": "cpu"}
    m = manifest["metrics"]
    assert m["mean_kld"] >= 0 and m["ppl"] > 0 and 0 <= m["top1"] <= 1
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    calibrated = name in ("fp8-static", "w8a8-sq-gptq", "w4a16-gptq", "w4a16-awq", "nvfp4", "fp8-dynamic-kv-fp8")
    assert (manifest["data"]["calibration"] is not None) == calibrated
    if name == "nvfp4":
        assert manifest["data"]["calibration"]["samples"] == 4  # the per-variant override
    recipe_yaml = (folder / "recipe.yaml").read_text()
    expected = {"w8a8-sq-gptq": "GPTQModifier", "w4a16-gptq": "GPTQModifier", "w4a16-awq": "AWQModifier"}
    assert expected.get(name, "QuantizationModifier") in recipe_yaml
    if name == "w8a8-sq-gptq":
        assert "SmoothQuantModifier" in recipe_yaml


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_loads_back_with_transformers(built, name):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built["published"][name], dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.arange(32)[None]).logits
    assert torch.isfinite(logits).all()


def test_quality_ranks_as_bits_suggest(built):
    """On a random tiny model too: 8-bit formats stay closer to the baseline than 4-bit ones."""
    kld = {n: json.loads((p / "manifest.json").read_text())["metrics"]["mean_kld"] for n, p in built["published"].items()}
    assert max(kld["w8a16"], kld["w8a8-sq-gptq"]) < min(kld["w4a16-gptq"], kld["nvfp4a16"], kld["mxfp4a16"])


def test_fp4_weights_are_the_stored_values_exactly(built):
    import torch
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from safetensors.torch import load_file

    from pipeline.backends.llmcompressor import LLMCompressorBackend

    folder = built["published"]["nvfp4a16"]
    stored = load_file(str(folder / "model.safetensors"))
    model = LLMCompressorBackend().load_for_eval(folder, "cpu")
    name = "model.layers.0.mlp.down_proj"
    packed = stored[f"{name}.weight_packed"]
    rows, cols = packed.shape[0], packed.shape[1] * 2
    q = unpack_fp4_from_uint8(packed, rows, cols, dtype=torch.float32)
    scale = stored[f"{name}.weight_scale"].float() / stored[f"{name}.weight_global_scale"].float()
    expected = (q.view(rows, -1, 16) * scale[:, :, None]).view(rows, cols)
    torch.testing.assert_close(model.get_submodule(name).weight, expected, rtol=0, atol=0)


def test_fp8_kv_cache_is_calibrated_stored_and_simulated(built):
    """``kv_cache_scheme: fp8``: llm-compressor calibrates a k and v scale per attention layer,
    the checkpoint declares the scheme as vLLM reads it, and the evaluation quantizes keys and
    values with those scales (compressed-tensors' own KV-cache hooks): switching them off changes
    the logits."""
    import torch
    from safetensors.torch import load_file

    from pipeline.backends.llmcompressor import LLMCompressorBackend

    folder = built["published"]["fp8-dynamic-kv-fp8"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"]["kv_cache"] == "fp8" and "KV cache: FP8" in manifest["evaluation"]["method"]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"]["type"] == "float" and config["kv_cache_scheme"]["num_bits"] == 8
    stored = load_file(str(folder / "model.safetensors"))
    for layer in (0, 1):
        for kind in ("k", "v"):
            scale = stored[f"model.layers.{layer}.self_attn.{kind}_scale"]
            assert scale.numel() == 1 and float(scale) > 0
    model = LLMCompressorBackend().load_for_eval(folder, "cpu")
    assert model.modelbuild_kv_cache_layers == 2
    ids = torch.arange(3, 35)[None]
    with torch.no_grad():
        with_kv = model(ids).logits
        for module in model.modules():
            if hasattr(module, "kv_cache"):
                module.quantization_enabled = False
        without = model(ids).logits
    assert not torch.equal(with_kv, without)


def test_hf_dataset_calibration_offline(cli, tiny_model, wikitext, tmp_path, dirs, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    recipe = _recipe(tmp_path, tiny_model, wikitext, {"fp8-static": "scheme: FP8"})
    text = recipe.read_text().replace(
        f"calibration:\n  path: {wikitext / 'valid.txt'}\n",
        f"calibration:\n  dataset: {{path: text, data_files: {wikitext / 'valid.txt'}}}\n",
    )
    recipe.write_text(text)
    code, _, err = cli("run", recipe)
    assert code == 0, err
    manifest = json.loads(next(dirs["storage"].rglob("manifest.json")).read_text())
    assert manifest["data"]["calibration"]["dataset"]["path"] == "text"
    assert len(manifest["data"]["calibration"]["sha256"]) == 64


def test_calibration_samples_are_seeded(tiny_model, wikitext):
    from transformers import AutoTokenizer

    from pipeline.quality.calibration import calibration_samples
    from pipeline.recipe.schema import Calibration

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cal = Calibration(path=wikitext / "valid.txt")
    a = calibration_samples(cal, samples=8, seq_len=64, seed=1, tokenizer=tok)
    b = calibration_samples(cal, samples=8, seq_len=64, seed=1, tokenizer=tok)
    c = calibration_samples(cal, samples=8, seq_len=64, seed=2, tokenizer=tok)
    assert a == b and a != c and all(len(x) == 64 for x in a)


BAD = {
    "group_size_does_not_divide": ({"w4": "scheme: W4A16"}, "", "group size 128 does not divide"),
    "target_gpu_too_old": ({"fp8": "scheme: FP8_DYNAMIC"}, "targets:\n  - gpu: T4\n", "needs compute capability 8.9+"),
    "unknown_target_gpu": ({"fp8": "scheme: FP8_DYNAMIC"}, "targets:\n  - gpu: TPUv5\n", "unknown GPU"),
    "awq_on_fp8": ({"x": "scheme: FP8_DYNAMIC\n    algorithm: awq"}, "", "awq applies to weight-only INT"),
    "group_size_on_fp4": ({"x": "scheme: NVFP4A16\n    group_size: 32"}, "", "fixes its own grouping"),
    "calibration_too_small": ({"x": "scheme: FP8\n    calibration: {samples: 5000, seq_len: 4096}"}, "",
                              "calibration text too short"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scheme_input_is_one_line(cli, tiny_model, wikitext, tmp_path, dirs, case):
    variants, extra, expect = BAD[case]
    recipe = _recipe(tmp_path, tiny_model, wikitext, variants, extra=extra)
    code, _, err = cli("run", recipe)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert not list(dirs["storage"].rglob("manifest.json"))


def test_scheme_missing_from_the_pinned_library(cli, tiny_model, wikitext, tmp_path, monkeypatch):
    from compressed_tensors.quantization import quant_scheme

    monkeypatch.delitem(quant_scheme.PRESET_SCHEMES, "MXFP4A16")
    recipe = _recipe(tmp_path, tiny_model, wikitext, {"x": "scheme: MXFP4A16"})
    code, _, err = cli("plan", recipe)
    assert code == 2 and "not supported by the installed compressed-tensors" in err


def test_model_free_entrypoint_writes_the_same_tensors_as_oneshot(cli, tiny_model, wikitext, tmp_path, dirs):
    """Shard-by-shard quantization (llm-compressor's model_free_ptq) gives the in-memory path's
    tensors, bit for bit, for every data-free family."""
    import torch
    from safetensors.torch import load_file

    pairs = {"fp8": "scheme: FP8_DYNAMIC", "w4": "scheme: W4A16\n    group_size: 32", "nv": "scheme: NVFP4A16"}
    variants = {}
    for name, opts in pairs.items():
        variants[f"{name}-oneshot"] = opts
        variants[f"{name}-free"] = opts + "\n    entrypoint: model_free"
    code, _, err = cli("run", _recipe(tmp_path, tiny_model, wikitext, variants))
    assert code == 0, err
    folders = {p.parent.parent.name: p.parent for p in dirs["storage"].rglob("manifest.json")}
    for name in pairs:
        a = load_file(str(folders[f"{name}-oneshot"] / "model.safetensors"))
        b = load_file(str(folders[f"{name}-free"] / "model.safetensors"))
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_model_free_refuses_calibrated_variants(tmp_path, tiny_model, wikitext):
    from pipeline.errors import RecipeError
    from pipeline.recipe import load_recipe

    path = _recipe(tmp_path, tiny_model, wikitext, {"x": "scheme: W4A16\n    algorithm: gptq\n    entrypoint: model_free"})
    with pytest.raises(RecipeError, match="model_free takes data-free"):
        load_recipe(path)


def test_awq_grid_too_small_for_duo_scaling(tmp_path, tiny_model, wikitext):
    from pipeline.errors import RecipeError
    from pipeline.recipe import load_recipe

    path = _recipe(tmp_path, tiny_model, wikitext, {"x": "scheme: W4A16\n    algorithm: awq\n    awq: {n_grid: 2}"})
    with pytest.raises(RecipeError, match="n_grid must be at least 3"):
        load_recipe(path)


def test_targets_that_can_run_the_variants_plan(cli, tiny_model, wikitext, tmp_path):
    recipe = _recipe(tmp_path, tiny_model, wikitext, {"fp8": "scheme: FP8_DYNAMIC", "w8": "scheme: W8A8"},
                     extra="targets:\n  - gpu: T4\n  - gpu: h100\n")
    code, out, err = cli("plan", recipe)
    assert code == 0, err


def test_chat_template_wraps_each_sample(tiny_model, wikitext, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.errors import DataError
    from pipeline.quality.calibration import calibration_samples
    from pipeline.recipe.schema import Calibration

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cal = Calibration(path=wikitext / "valid.txt", chat_template=True)
    with pytest.raises(DataError, match="no chat template"):
        calibration_samples(cal, samples=2, seq_len=64, seed=0, tokenizer=tok)
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    plain = calibration_samples(Calibration(path=wikitext / "valid.txt"), samples=2, seq_len=64, seed=0, tokenizer=tok)
    wrapped = calibration_samples(cal, samples=2, seq_len=64, seed=0, tokenizer=tok)
    bos = tok.convert_tokens_to_ids("<s>")
    assert all(w[0] == bos for w in wrapped) and all(p[0] != bos for p in plain)
    assert all(len(w) <= 64 for w in wrapped)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_layer_by_layer_scores_equal_the_whole_model(built, name, tmp_path):
    """The streamed evaluation decompresses each layer from the files as it goes and gives the
    numbers of the whole dequantized model (activation simulation included)."""
    import torch

    from pipeline.backends.llmcompressor import LLMCompressorBackend
    from pipeline.quality.runner import torch_forward, window_logprobs

    folder = built["published"][name]
    windows = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    backend = LLMCompressorBackend()
    whole = list(window_logprobs(torch_forward(backend.load_for_eval(folder, "cpu")), windows, "cpu"))
    streamed = list(backend.scores(folder, windows, "cpu", tmp_path))
    assert len(streamed) == len(whole) == 2
    for (lp, _), (want, _) in zip(streamed, whole, strict=True):
        torch.testing.assert_close(lp, want, rtol=0, atol=0)



@pytest.mark.parametrize(("opts", "passes"), [
    ({"scheme": "W4A16", "algorithm": "gptq", "group_size": 32}, 1),
    ({"scheme": "NVFP4"}, 1),
    ({"scheme": "FP8"}, 1),
    ({"scheme": "W8A8", "algorithm": "gptq", "smoothquant": {"smoothing_strength": 0.5}}, 2),
    ({"scheme": "W4A16_ASYM", "algorithm": "awq", "group_size": 32, "awq": {"n_grid": 3}}, 2),
], ids=["gptq", "nvfp4", "fp8-static", "smoothquant-gptq", "awq"])
def test_calibration_a_layer_at_a_time_against_an_fp32_model(tmp_path, tiny_model, opts, passes):
    """The bf16 model held in memory with one layer computed in fp32 at a time, against the model
    loaded whole in fp32 (what llm-compressor's examples do on a CPU): one calibration pass gives
    the same tensors bit for bit. Smoothing (SmoothQuant, AWQ) is llm-compressor's own pass
    before the quantizing one, and its rewritten weights are stored in bf16 between the two
    (as on a GPU builder): the quantized codes then differ by rounding only (at most 2 steps,
    on a minority of values), everything else is identical."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.backends import llmcompressor as lc

    variant = lc.LLMCompressorVariant(name="x", backend="llmcompressor", **opts)
    g = torch.Generator().manual_seed(0)
    calibration = [torch.randint(3, 512, (64,), generator=g).tolist() for _ in range(8)]
    lc.LLMCompressorBackend().quantize(variant, tiny_model, tmp_path / "layered", calibration=calibration, device="cpu")

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": calibration, "attention_mask": [[1] * 64 for _ in calibration]})
    with lc._threads_for(variant, "cpu", model.config), lc._no_pinning_without_accelerator():
        oneshot(model=model, recipe=lc._modifiers(variant), dataset=data, num_calibration_samples=8,
                max_seq_length=64, shuffle_calibration_samples=False)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.dtype == torch.float32 and not any(k in name for k in lc._KEEP_DTYPE):
                tensor.data = tensor.data.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "whole", save_compressed=True)

    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "layered" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    if passes == 1:
        assert not different, different
        return
    assert different, "smoothing rounded between passes should show (else this test is vacuous)"
    for name in different:
        assert name.endswith(("weight", "weight_packed", "weight_scale", "weight_zero_point")), name
        if name.endswith("weight_scale"):  # one bf16 rounding step
            torch.testing.assert_close(a[name].float(), b[name].float(), rtol=2**-7, atol=0)
            continue
        if name.endswith("weight_packed"):
            shape = tuple(int(v) for v in a[name.replace("packed", "shape")])
            x, y = (unpack_from_int32(t, 4, torch.Size(shape)) for t in (a[name], b[name]))
        elif name.endswith("weight_zero_point"):
            x, y = (unpack_from_int32(t, 4, torch.Size((t.shape[0] * 8, t.shape[1])), packed_dim=0)
                    for t in (a[name], b[name]))
        else:
            x, y = a[name], b[name]
        steps = (x.int() - y.int()).abs()
        assert steps.max() <= 2 and (steps > 0).float().mean() < 0.25, (name, steps.max(), (steps > 0).float().mean())


def test_gptq_compresses_on_one_thread_and_calibrates_on_all(tmp_path, tiny_model, monkeypatch):
    """On a narrow model (hidden 64 < GPTQ_ALL_THREADS_FROM_HIDDEN) GPTQ's per-layer compression
    runs on one CPU thread and the calibration forwards on every thread the process has; the
    library's method is restored afterwards."""
    import torch
    from llmcompressor.modifiers.quantization import GPTQModifier

    from pipeline.backends import llmcompressor as lc

    seen: dict[str, set[int]] = {"forward": set(), "compress": set()}
    library = GPTQModifier.compress_module_list

    def compress_module_list(self, modules):
        seen["compress"].add(torch.get_num_threads())
        return library(self, modules)

    monkeypatch.setattr(GPTQModifier, "compress_module_list", compress_module_list)
    original = GPTQModifier.compress_modules
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen["forward"].add(torch.get_num_threads()) if isinstance(module, torch.nn.Linear) else None)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        variant = lc.LLMCompressorVariant(name="x", backend="llmcompressor", scheme="W4A16", algorithm="gptq", group_size=32)
        g = torch.Generator().manual_seed(0)
        calibration = [torch.randint(3, 512, (64,), generator=g).tolist() for _ in range(4)]
        lc.LLMCompressorBackend().quantize(variant, tiny_model, tmp_path / "out", calibration=calibration, device="cpu")
    finally:
        hook.remove()
        torch.set_num_threads(before)
    assert seen == {"forward": {2}, "compress": {1}}
    assert GPTQModifier.compress_modules is original
