"""GGUF variants through llama.cpp on a tiny model with SmolLM2's tokenizer: conversion, types,
importance matrix, overrides, splitting, metadata, fidelity gates, evaluation in llama.cpp, speed,
publishing, and the bad inputs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, copy_tokenizer


@pytest.fixture(scope="module")
def toolchain():
    from pipeline.toolchains import llamacpp

    try:
        return llamacpp.find()
    except Exception as e:  # noqa: BLE001 - the message says how to build it
        pytest.fail(f"{e} (bash .ci/setup builds it)")


def gguf_recipe(folder: Path, model: Path, wikitext: Path, variants: str, *, calibration: bool = True,
                gguf: str = "", gate: str = "max_kld: 5.0", name: str = "tiny-smol") -> Path:
    cal = f"calibration:\n  path: {wikitext / 'valid.txt'}\n  samples: 4\n  seq_len: 128\n" if calibration else ""
    text = (
        f"name: {name}\nsource:\n  kind: local\n  path: {model}\n  license: apache-2.0\n{cal}"
        f"eval:\n  corpus: {wikitext / 'test.txt'}\n  tokens: 512\n  seq_len: 128\n  gate:\n    {gate}\n"
        "gguf:\n  metadata:\n    name: Tiny Smol\n    basename: TinySmol\n    size_label: 3M\n    finetune: Instruct\n"
        "    base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n"
        "  speed:\n    prompt_tokens: 32\n    gen_tokens: 8\n    repetitions: 2\n"
        f"{gguf}"
        f"variants:\n{textwrap.indent(textwrap.dedent(variants), '  ')}"
    )
    path = folder / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _published(storage: Path, variant: str) -> Path:
    [version] = [p for p in (storage / "tiny-smol" / variant).iterdir() if (p / "manifest.json").is_file()]
    return version


def test_gguf_types_build_evaluate_and_publish(cli, dirs, tmp_path, tiny_smol, wikitext, toolchain):
    recipe = gguf_recipe(tmp_path, tiny_smol, wikitext, """\
        - name: gguf-f16
          backend: llamacpp
          type: F16
        - name: gguf-q8
          backend: llamacpp
          type: Q8_0
          split_max_size: 3M
        - name: gguf-q4km
          backend: llamacpp
          type: Q4_K_M
          token_embedding_type: q8_0
          tensor_types:
            attn_v: q4_1
        - name: gguf-q4km-plain
          backend: llamacpp
          type: Q4_K_M
          imatrix: false
    """)
    code, _, err = cli("run", recipe)
    assert code == 0, err
    # One conversion and one importance matrix, shared.
    assert err.count("gguf/convert-f16: done") == 1 and err.count("gguf/imatrix-") >= 1

    from pipeline.backends.llamacpp import LlamaEval
    from pipeline.toolchains.gguf_reader import read_metadata

    manifests = {}
    for variant in ("gguf-f16", "gguf-q8", "gguf-q4km", "gguf-q4km-plain"):
        folder = _published(dirs["storage"], variant)
        m = json.loads((folder / "manifest.json").read_text())
        manifests[variant] = m
        assert m["format"]["format"] == "gguf" and m["format"]["engines"] == ["llamacpp"]
        files = m["gguf"]["files"]
        assert m["serve"]["llamacpp"] == f"llama-server -m {folder}/{files[0]}"
        # Speed from llama-bench on this CPU, quality from llama.cpp itself, fidelity recorded.
        assert m["speed"]["pp32_tps"] > 0 and m["speed"]["tg8_tps"] > 0 and m["speed"]["cpu_model"]
        assert m["metrics"]["mean_kld"] >= 0 and "llama.cpp" in m["evaluation"]["method"]
        assert m["fidelity"]["tokenizer"]["mismatches"] == 0
        assert m["fidelity"]["f16_mean_kld"] <= 1e-3
        assert m["tools"]["llama.cpp"].startswith("0.3.36+")
        # Loads in llama-cpp-python and computes logits for the vocabulary.
        engine = LlamaEval(folder / files[0], threads=1)
        import torch

        logits = engine(torch.tensor([[1, 504, 3575, 282]]))
        engine.close()
        assert logits.shape == (4, 49152) and torch.isfinite(logits).all()

    # File names per the GGUF spec, metadata from the recipe, the chat template carried over.
    q8 = manifests["gguf-q8"]["gguf"]
    assert q8["files"] == ["TinySmol-3M-Instruct-Q8_0-00001-of-00003.gguf", "TinySmol-3M-Instruct-Q8_0-00002-of-00003.gguf",
                           "TinySmol-3M-Instruct-Q8_0-00003-of-00003.gguf"]
    q4 = manifests["gguf-q4km"]["gguf"]
    assert q4["files"] == ["TinySmol-3M-Instruct-Q4_K_M.gguf"]
    meta = read_metadata(_published(dirs["storage"], "gguf-q4km") / q4["files"][0])
    assert meta["general.name"] == "Tiny Smol" and meta["general.basename"] == "TinySmol"
    assert meta["general.size_label"] == "3M" and meta["general.finetune"] == "Instruct"
    assert meta["general.quantized_by"] == "modelbuild" and meta["general.license"] == "apache-2.0"
    assert meta["general.base_model.0.repo_url"] == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert "im_start" in meta["tokenizer.chat_template"] and meta["tokenizer.ggml.pre"] == "smollm"
    # The overrides took effect (token embeddings at q8_0, attn_v at q4_1: K-types fall back on
    # 64-wide rows) and the imatrix was used.
    from pipeline.toolchains.gguf_reader import tensor_types

    types = tensor_types(_published(dirs["storage"], "gguf-q4km") / q4["files"][0])
    assert types["token_embd.weight"] == "q8_0"
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == "q4_1"
    assert sum(q4["tensor_types"].values()) == len(types)
    assert q4["imatrix_sha256"] and manifests["gguf-q4km-plain"]["gguf"]["imatrix_sha256"] is None
    assert manifests["gguf-q4km"]["data"]["calibration"]["samples"] == 4
    # The importance matrix is recorded by name, not by a path on the build machine.
    assert meta["quantize.imatrix.file"] == "imatrix.gguf"
    assert meta["quantize.imatrix.dataset"] == "valid.txt-4x128-seed0.txt"
    assert manifests["gguf-f16"]["gguf"]["tensor_types"].keys() <= {"f16", "f32"}
    # A rerun does nothing.
    code, _, err = cli("run", recipe)
    assert code == 0 and "done" not in err, err


def test_fidelity_gate_fails_every_gguf_variant(cli, dirs, tmp_path, tiny_smol, wikitext, toolchain):
    """Break the conversion check on purpose: no F16 file computes exactly the baseline's
    distributions (max_kld 0), so the gate fails and nothing is published."""
    recipe = gguf_recipe(tmp_path, tiny_smol, wikitext, "- name: gguf-q8\n  backend: llamacpp\n  type: Q8_0\n",
                         gguf="  fidelity:\n    max_kld: 0.0\n")
    code, _, err = cli("run", recipe)
    assert code == 3, err
    assert "gate failed: gguf-q8: gguf_f16_mean_kld" in err
    assert not (dirs["storage"] / "tiny-smol" / "gguf-q8").exists()


def test_tokenizer_check_finds_a_different_tokenizer(tmp_path, tiny_smol, tiny_model, wikitext, toolchain):
    """Break the tokenizer check on purpose: the GGUF's vocabulary against another tokenizer."""
    from transformers import AutoTokenizer

    from pipeline.sources.tokenizer_check import AWKWARD_STRINGS
    from pipeline.stages.gguf_fidelity import compare_tokenizers
    from pipeline.toolchains import llamacpp_tools

    out = tmp_path / "tiny.gguf"
    llamacpp_tools.convert(tiny_smol, out, "f16", {"general.name": "t"})
    texts = [(wikitext / "test.txt").read_text(encoding="utf-8")[:20000], *AWKWARD_STRINGS]
    same = compare_tokenizers(out, AutoTokenizer.from_pretrained(tiny_smol), texts)
    assert same["mismatches"] == 0 and same["tokens"] > 1000
    other = compare_tokenizers(out, AutoTokenizer.from_pretrained(tiny_model), texts)
    assert other["mismatches"] == len(texts) and other["first"][0]["gguf"] != other["first"][0]["hf"]


@pytest.fixture(scope="module")
def tiny_smol_wide_heads(tmp_path_factory, tiny_smol) -> Path:
    """The tiny model with two heads of 32 (a quantized llama.cpp KV cache stores blocks of 32)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-smol-32")
    for path in tiny_smol.iterdir():  # the tokenizer and its template; the weights are new
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, out / path.name)
    config = LlamaConfig.from_pretrained(tiny_smol)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def test_kv_cache_types_are_measured_in_llama_cpp_and_served(cli, dirs, tmp_path, tiny_smol_wide_heads, wikitext,
                                                             toolchain):
    """Each KV-cache type of a variant is scored in llama.cpp with its cache in that type: its
    KLD cost is in the manifest and the report, and a serving profile sets the same flags."""
    recipe = gguf_recipe(tmp_path, tiny_smol_wide_heads, wikitext, """\
        - name: gguf-q8
          backend: llamacpp
          type: Q8_0
          kv_cache_types: [q8_0, q4_0]
    """, calibration=False)
    code, _, err = cli("run", recipe)
    assert code == 0, err
    m = json.loads((_published(dirs["storage"], "gguf-q8") / "manifest.json").read_text())
    kv = m["kv_cache"]
    assert sorted(kv) == ["q4_0", "q8_0"]
    for kind, figures in kv.items():
        assert figures["tokens_scored"] == m["metrics"]["tokens_scored"], kind
        assert figures["added_mean_kld"] == pytest.approx(figures["mean_kld"] - m["metrics"]["mean_kld"])
    # A coarser cache costs more, and a quantized cache is not free: the cache type reached llama.cpp.
    assert kv["q4_0"]["mean_kld"] > kv["q8_0"]["mean_kld"] > m["metrics"]["mean_kld"]
    profiles = {p["name"]: p for p in m["serving_profiles"]}
    assert "--cache-type-k q4_0 --cache-type-v q4_0 --flash-attn on" in profiles["llamacpp-q8_0-cpu-kv-q4_0"]["command"]
    assert "--cache-type-k" not in profiles["llamacpp-q8_0-cpu"]["command"]
    # The cache is a serving choice: the file's key is the one built without it.
    from pipeline.backends.llamacpp import LlamaCppVariant

    spec = {"name": "g", "backend": "llamacpp", "type": "Q8_0"}
    assert LlamaCppVariant(**spec, kv_cache_types=["q4_0"]).backend_params() == LlamaCppVariant(**spec).backend_params()
    code, out, err = cli("report", recipe, "--storage", str(dirs["storage"]), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    assert "KV cache q4_0: KLD +" in (tmp_path / "rep" / "report.md").read_text()


def test_bad_gguf_input(cli, dirs, tmp_path, tiny_smol, tiny_model, wikitext, toolchain):
    # A head dimension a quantized cache cannot store (16: blocks are 32): refused at plan time.
    recipe = gguf_recipe(tmp_path, tiny_smol, wikitext, "- name: g\n  backend: llamacpp\n  type: Q8_0\n"
                         "  kv_cache_types: [q8_0]\n", calibration=False)
    code, _, err = cli("plan", recipe)
    assert code == 2 and "kv_cache_types" in err and "head dimension is 16" in err, err
    # A KV-cache type llama-server does not take, or one twice: one line naming the field.
    recipe = gguf_recipe(tmp_path, tiny_smol, wikitext, "- name: g\n  backend: llamacpp\n  type: Q8_0\n"
                         "  kv_cache_types: [q3_k]\n", calibration=False)
    code, _, err = cli("validate", recipe)
    assert code == 2 and "kv_cache_types" in err and "q8_0" in err and len(err.strip().splitlines()) == 1
    recipe = gguf_recipe(tmp_path, tiny_smol, wikitext, "- name: g\n  backend: llamacpp\n  type: Q8_0\n"
                         "  kv_cache_types: [q8_0, q8_0]\n", calibration=False)
    code, _, err = cli("validate", recipe)
    assert code == 2 and "each KV-cache type once" in err and len(err.strip().splitlines()) == 1
    # Unknown type: the schema names the allowed ones.
    recipe = gguf_recipe(tmp_path, tiny_smol, wikitext, "- name: g\n  backend: llamacpp\n  type: Q4_K_X\n")
    code, _, err = cli("validate", recipe)
    assert code == 2 and "variants.0.type" in err and "Q4_K_M" in err and len(err.strip().splitlines()) == 1
    # An importance matrix without calibration text.
    recipe = gguf_recipe(tmp_path, tiny_smol, wikitext, "- name: g\n  backend: llamacpp\n  type: Q8_0\n  imatrix: true\n",
                         calibration=False)
    code, _, err = cli("validate", recipe)
    assert code == 2 and "needs a 'calibration' section" in err
    # ... also when it is on by default (4-bit types).
    recipe = gguf_recipe(tmp_path, tiny_smol, wikitext, "- name: g\n  backend: llamacpp\n  type: Q4_K_M\n",
                         calibration=False)
    assert cli("validate", recipe)[0] == 2
    # A tokenizer the converter cannot map (a BPE trained for the tests: unknown pre-tokenizer hash):
    # one line naming the cause; nothing half-written in the cache.
    recipe = gguf_recipe(tmp_path, tiny_model, wikitext, "- name: g\n  backend: llamacpp\n  type: Q8_0\n")
    code, _, err = cli("run", recipe)
    assert code == 2, err
    [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "tokenizer cannot be mapped" in line and "llama.cpp 0c1e570" in line
    assert not list((dirs["cache"] / "tmp").glob("*")) if (dirs["cache"] / "tmp").exists() else True


def test_unsupported_architecture_fails_at_plan_time(cli, tmp_path, wikitext, toolchain, tiny_model):
    """An architecture llama.cpp's converter does not map fails before any work, naming it and
    the llama.cpp version."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from pipeline.toolchains.llamacpp_tools import supported_architectures

    assert "LlamaForCausalLM" in supported_architectures()
    assert "OPTForCausalLM" not in supported_architectures()
    model = tmp_path / "opt"
    config = OPTConfig(vocab_size=512, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                       word_embed_proj_dim=32, max_position_embeddings=256)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(model)
    copy_tokenizer(tiny_model, model)
    recipe = gguf_recipe(tmp_path, model, wikitext, "- name: g\n  backend: llamacpp\n  type: Q8_0\n")
    code, _, err = cli("plan", recipe)
    assert code == 2, err
    assert "architecture OPTForCausalLM is not supported by llama.cpp's converter (llama.cpp 0c1e570" in err
    assert "variants.0" in err


def test_unwritable_output_leaves_nothing_half_written(cli, dirs, tmp_path, tiny_smol, wikitext, toolchain):
    """The converter hits a file-size limit (as on a full disk): one line, exit 4, and neither the
    cache nor the storage holds a partial file."""
    variants = "- name: gguf-q8\n  backend: llamacpp\n  type: Q8_0\n"
    # Build fetch and baseline first (their files are larger than the limit below).
    recipe = gguf_recipe(tmp_path, tiny_smol, wikitext, variants, gguf="  fidelity:\n    max_kld: 0.0\n")
    assert cli("run", recipe)[0] == 3
    entries = sorted(p.name for p in (dirs["cache"] / "objects").glob("*/*"))
    # A new conversion (other metadata) under a 2 MB file-size limit: the F16 file is ~6.6 MB.
    recipe.write_text(recipe.read_text().replace("name: Tiny Smol", "name: Tiny Smol Two"))
    limit = 2 * 1024 * 1024
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(recipe), "--cache-dir", str(dirs["cache"]),
         "--storage", str(dirs["storage"])],
        cwd=REPO, capture_output=True, text=True, check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 4, proc.stderr[-2000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "gguf/convert-f16" in line and "llama.cpp's converter failed" in line
    assert sorted(p.name for p in (dirs["cache"] / "objects").glob("*/*")) == entries
    assert not [p for p in (dirs["cache"] / "tmp").iterdir()] if (dirs["cache"] / "tmp").exists() else True
    assert not (dirs["storage"] / "tiny-smol").exists() or not any((dirs["storage"] / "tiny-smol").rglob("*.gguf"))
