"""Serving profiles: how each deployment target runs a published variant, per engine.

- **TensorRT-LLM**: ``trtllm-serve`` for one target shape (tensor/pipeline parallel size, batch
  and token limits) plus its extra options file (``--extra_llm_api_options``, accepted by every
  1.x release; newer ones also call it ``--config``): the LLM API arguments of the PyTorch
  backend, KV-cache dtype and memory fraction included.
- **vLLM**: ``vllm serve PATH --config FILE``, the file holding ``vllm serve``'s own long options
  (tensor/pipeline parallel size, ``max-num-seqs``, ``max-num-batched-tokens``, ``max-model-len``,
  KV-cache dtype); the quantization method is read from the checkpoint's config, as vLLM does.
- **llama.cpp**: ``llama-server`` arguments (it has no options file): one CPU profile, and one
  offloading every layer to the GPU when the recipe declares GPU targets; each again with every
  KV-cache type the variant measured (``kv_cache_types``: ``-ctk/-ctv``).

Profiles are named like the ecosystem's (``trtllm-fp8-tp2``, ``vllm-w4a16-tp1``,
``llamacpp-q4_k_m-cpu``); targets whose GPU cannot run the format in an engine get no profile for
it (the planner already refused a variant that no target can run). ``{path}`` in a command is the
published folder, ``{file}`` (llama.cpp) the GGUF file, both filled in at publish.

Which builder makes an engine's profiles is the engine's catalogue record's ``profiles``
(``pipeline.engines``); every builder takes ``(backend, variant, fmt, targets)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from pipeline import engines
from pipeline.hardware import compute_capability

PROFILE_DIR = "serving"


def trtllm_profiles(backend, variant, fmt, targets) -> list[dict[str, Any]]:
    """One profile per distinct serving shape among the targets that can run the variant in
    TensorRT-LLM's PyTorch backend. Each is ``{name, engine, gpus, tp, pp, options, command}``;
    ``command`` has ``{path}`` where the published folder goes.

    Args:
        variant: a ModelOpt variant (the one format that declares the ``trtllm`` engine): its
            ``qformat`` names the profiles, its ``kv_cache_qformat`` sets the KV-cache dtype.
    """
    profiles: dict[str, dict[str, Any]] = {}
    slug = variant.qformat.replace("_", "-")
    for target in targets:
        if not backend.runs_on(variant, compute_capability(target.gpu), "trtllm"):
            continue
        options = _options(variant, target)
        name = f"trtllm-{slug}-tp{target.tp}" + (f"-pp{target.pp}" if target.pp > 1 else "")
        if name in profiles and profiles[name]["options"] != options:
            name = f"{name}-{target.gpu.lower()}"  # same parallelism, other limits: one file per GPU
        if name in profiles:
            profiles[name]["gpus"].append(target.gpu)
            continue
        options_file = f"{PROFILE_DIR}/{name}.yaml"
        command = " ".join([
            "trtllm-serve", "{path}", "--backend", "pytorch",
            "--tp_size", str(target.tp), "--pp_size", str(target.pp),
            "--max_batch_size", str(target.max_batch_size), "--max_num_tokens", str(target.max_num_tokens),
            *(("--max_seq_len", str(target.max_seq_len)) if target.max_seq_len else ()),
            "--kv_cache_free_gpu_memory_fraction", f"{target.kv_cache_free_gpu_memory_fraction:g}",
            "--host", "0.0.0.0", "--port", str(engines.get("trtllm").port),
            "--extra_llm_api_options", "{path}/" + options_file,
        ])
        profiles[name] = {"name": name, "engine": "trtllm", "gpus": [target.gpu], "tp": target.tp, "pp": target.pp,
                          "options_file": options_file, "options": options, "command": command}
    return list(profiles.values())


def _options(variant, target) -> dict[str, Any]:
    """TensorRT-LLM LLM API arguments (``TorchLlmArgs`` keys) for one target."""
    options: dict[str, Any] = {
        "tensor_parallel_size": target.tp,
        "pipeline_parallel_size": target.pp,
        "max_batch_size": target.max_batch_size,
        "max_num_tokens": target.max_num_tokens,
        "kv_cache_config": {
            # "auto" follows the checkpoint (hf_quant_config's kv_cache_quant_algo).
            "dtype": "fp8" if variant.kv_cache_qformat == "fp8" else "auto",
            "free_gpu_memory_fraction": target.kv_cache_free_gpu_memory_fraction,
        },
        "cuda_graph_config": {"enable_padding": True, "max_batch_size": target.max_batch_size},
    }
    if target.max_seq_len:
        options["max_seq_len"] = target.max_seq_len
    return options


def vllm_profiles(backend, variant, fmt, targets) -> list[dict[str, Any]]:
    """``vllm serve`` profiles, one per distinct shape among the targets that run the variant in vLLM."""
    profiles: dict[str, dict[str, Any]] = {}
    slug = _slug(fmt.scheme)
    kv_fp8 = fmt.kv_cache == "fp8"  # the checkpoint carries calibrated k/v scales
    for target in targets:
        if not backend.runs_on(variant, compute_capability(target.gpu), "vllm"):
            continue
        options: dict[str, Any] = {
            "tensor-parallel-size": target.tp,
            "pipeline-parallel-size": target.pp,
            "max-num-seqs": target.max_batch_size,
            "max-num-batched-tokens": target.max_num_tokens,
            "kv-cache-dtype": "fp8" if kv_fp8 else "auto",
            "host": "0.0.0.0",
            "port": engines.get("vllm").port,
        }
        if target.max_seq_len:
            options["max-model-len"] = target.max_seq_len
        name = f"vllm-{slug}-tp{target.tp}" + (f"-pp{target.pp}" if target.pp > 1 else "")
        if name in profiles and profiles[name]["options"] != options:
            name = f"{name}-{target.gpu.lower()}"
        if name in profiles:
            profiles[name]["gpus"].append(target.gpu)
            continue
        options_file = f"{PROFILE_DIR}/{name}.yaml"
        profiles[name] = {"name": name, "engine": "vllm", "gpus": [target.gpu], "tp": target.tp, "pp": target.pp,
                          "options_file": options_file, "options": options,
                          "command": f"vllm serve {{path}} --config {{path}}/{options_file}"}
    return list(profiles.values())


def llamacpp_profiles(backend, variant, fmt, targets) -> list[dict[str, Any]]:
    """``llama-server`` profiles: CPU, plus full GPU offload when the recipe declares GPU targets."""
    slug = _slug(variant.type)
    out = []
    # (kind, slots, context length per slot or None for the model's, GPUs)
    shapes: list[tuple[str, int, int | None, list[str]]] = [("cpu", 2, None, [])] + ([("gpu", min(16, max(t.max_batch_size for t in targets)),
                                        max((t.max_seq_len or 0) for t in targets) or None,
                                        [t.gpu for t in targets])] if targets else [])
    for kind, slots, seq_len, gpus in shapes:
        args = ["--host", "0.0.0.0", "--port", str(engines.get("llamacpp").port), "--parallel", str(slots),
                # llama-server splits --ctx-size across its slots; 0 takes the model's context length.
                "--ctx-size", str(slots * seq_len) if seq_len else "0"]
        if kind == "gpu":
            args += ["--n-gpu-layers", "999"]
        # One profile per measured KV-cache type too (flash attention: llama.cpp needs it for a
        # quantized V cache).
        for cache in [None, *variant.kv_cache_types]:
            extra = [] if cache is None else ["--cache-type-k", cache, "--cache-type-v", cache, "--flash-attn", "on"]
            name = f"llamacpp-{slug}-{kind}" + ("" if cache is None else f"-kv-{_slug(cache)}")
            out.append({"name": name, "engine": "llamacpp", "gpus": gpus, "args": args + extra,
                        "command": " ".join(["llama-server", "-m", "{path}/{file}", *args, *extra])})
    return out


# The builder each catalogue record's ``profiles`` names.
BUILDERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "trtllm": trtllm_profiles,
    "vllm": vllm_profiles,
    "llama-server": llamacpp_profiles,
}


def profiles_for(backend, variant, targets) -> list[dict[str, Any]]:
    """Every engine's profiles for a variant (what its publish stage records), in the order its
    format lists the engines that load it."""
    fmt = backend.describe(variant)
    out = []
    for engine_id in fmt.engines:
        builder = engines.get(engine_id).profiles
        if builder is not None:
            out += BUILDERS[builder](backend, variant, fmt, targets)
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "-" for c in str(text).lower()).strip("-")


def profile_files(profiles: list[dict[str, Any]]) -> dict[str, str]:
    """Relative path -> YAML text of each profile's options file."""
    return {p["options_file"]: yaml.safe_dump(p["options"], sort_keys=False) for p in profiles if "options_file" in p}
