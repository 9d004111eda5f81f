"""Serving profiles: how each deployment target runs a published TensorRT-LLM variant.

A profile is TensorRT-LLM's ``trtllm-serve`` command for one target shape (tensor/pipeline
parallel size, batch and token limits) plus its extra options file (``--extra_llm_api_options``,
accepted by every 1.x release; newer ones also call it ``--config``): the LLM API arguments of the
PyTorch backend, KV-cache dtype and memory fraction included. Profiles are named like the
ecosystem's (``trtllm-fp8-tp2``); targets whose GPU cannot run the format get none (the planner
already refused a variant that no target can run).
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.compat import compute_capability

PROFILE_DIR = "serving"


def trtllm_profiles(backend, variant, targets) -> list[dict[str, Any]]:
    """One profile per distinct serving shape among the targets that can run the variant in
    TensorRT-LLM's PyTorch backend. Each is ``{name, engine, gpus, tp, pp, options, command}``;
    ``command`` has ``{path}`` where the published folder goes."""
    profiles: dict[str, dict[str, Any]] = {}
    fmt = variant.qformat.replace("_", "-")
    for target in targets:
        if not backend.runs_on(variant, compute_capability(target.gpu), "trtllm"):
            continue
        options = _options(variant, target)
        name = f"trtllm-{fmt}-tp{target.tp}" + (f"-pp{target.pp}" if target.pp > 1 else "")
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
            "--host", "0.0.0.0", "--port", "8000",
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


def profile_files(profiles: list[dict[str, Any]]) -> dict[str, str]:
    """Relative path -> YAML text of each profile's options file."""
    return {p["options_file"]: yaml.safe_dump(p["options"], sort_keys=False) for p in profiles}
