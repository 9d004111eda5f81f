"""GPUs and machines: which GPUs can run which formats, and what this machine has.

- **GPUs in recipes** (pure data and arithmetic, no torch): NVIDIA compute capabilities of common
  serving GPUs. The recipe schema validates target names against them, the planner compares each
  variant's GPU needs (from its backend) with the recipe's targets and checks that a model can be
  split the way a target asks.
- **This machine**, for stages that declare requirements (``Hints.requires``): checked, never
  assumed. The GPU architecture comes from ``nvidia-smi`` (the driver, so it works whatever
  PyTorch build is installed), TensorRT-LLM from importing it in the Python that will run the
  build. Results are remembered for the process.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

# Compute capability per GPU (NVIDIA's published table).
GPU_COMPUTE_CAPABILITY: dict[str, float] = {
    "V100": 7.0,
    "T4": 7.5,
    "A100": 8.0,
    "A30": 8.0,
    "A10": 8.6,
    "A10G": 8.6,
    "A40": 8.6,
    "RTX3090": 8.6,
    "L4": 8.9,
    "L40": 8.9,
    "L40S": 8.9,
    "RTX4090": 8.9,
    "H100": 9.0,
    "H200": 9.0,
    "GH200": 9.0,
    "B200": 10.0,
    "GB200": 10.0,
    "B300": 10.3,
    "RTX5090": 12.0,
}


def normalise_gpu(name: str) -> str:
    return name.upper().replace(" ", "").replace("-", "")


def compute_capability(name: str) -> float | None:
    return GPU_COMPUTE_CAPABILITY.get(normalise_gpu(name))


def known_gpu(name: str, *, cpu: bool = False) -> str:
    """A recipe's GPU name, normalised (``h100`` → ``H100``); ``cpu`` too when ``cpu``.

    Raises:
        ValueError: not a GPU of the table (the recipe schema turns it into one line with the field).
    """
    if cpu and name.lower() == "cpu":
        return "cpu"
    if compute_capability(name) is None:
        known = ("cpu, " if cpu else "") + ", ".join(GPU_COMPUTE_CAPABILITY)
        raise ValueError(f"unknown GPU {name!r}; known: {known}")
    return normalise_gpu(name)


def check_parallelism(tp: int, pp: int, config) -> str | None:
    """Why a model cannot be split ``tp`` x ``pp`` ways (None when it can).

    Tensor parallelism splits attention heads across GPUs: ``tp`` must divide the attention heads,
    and the KV heads either split evenly or are replicated (``tp`` a multiple of them), as vLLM
    and TensorRT-LLM do. Pipeline parallelism splits layers: at most one stage per layer.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    kv = getattr(text, "num_key_value_heads", None) or heads
    layers = getattr(text, "num_hidden_layers", None)
    if heads and heads % tp:
        return f"tp {tp} does not divide the model's {heads} attention heads"
    if kv and kv % tp and tp % kv:
        return f"tp {tp} neither divides the model's {kv} KV heads nor is a multiple of them"
    if layers and pp > layers:
        return f"pp {pp} exceeds the model's {layers} layers"
    return None


# TensorRT-LLM pins its own torch and transformers, so on a builder it usually lives in its own
# environment: this names that environment's Python (default: modelbuild's own).
TRTLLM_PYTHON_ENV = "MODELBUILD_TRTLLM_PYTHON"


def sm_name(compute_capability: float) -> str:
    return f"sm{int(round(compute_capability * 10))}"


def parse_compute_caps(text: str) -> list[str]:
    """``nvidia-smi --query-gpu=compute_cap --format=csv,noheader`` output -> ``["sm90", ...]``."""
    caps = []
    for line in text.splitlines():
        line = line.strip()
        try:
            caps.append(sm_name(float(line)))
        except ValueError:
            continue
    return caps


@functools.cache
def gpu_architectures() -> tuple[str, ...]:
    """Architectures of this machine's NVIDIA GPUs (empty when there are none)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        done = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(parse_compute_caps(done.stdout)) if done.returncode == 0 else ()


def trtllm_python() -> str:
    return os.environ.get(TRTLLM_PYTHON_ENV) or sys.executable


@functools.cache
def has_tensorrt_llm(python: str) -> bool:
    try:
        done = subprocess.run([python, "-c", "import tensorrt_llm"], capture_output=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def missing(requires: tuple[str, ...]) -> list[str]:
    """What of ``requires`` this machine lacks, one phrase each (empty: it can run the stage)."""
    lacking = []
    for need in requires:
        if need.startswith("gpu:"):
            arch = need.split(":", 1)[1]
            have = gpu_architectures()
            if arch not in have:
                names = [g for g, cc in GPU_COMPUTE_CAPABILITY.items() if sm_name(cc) == arch]
                lacking.append(f"an NVIDIA GPU of architecture {arch} ({', '.join(names) or 'any'}); "
                               f"this machine has {', '.join(have) if have else 'none'}")
        elif need == "tensorrt_llm":
            python = trtllm_python()
            # Only worth asking once the GPU is there (importing TensorRT-LLM takes a while).
            if not lacking and not has_tensorrt_llm(python):
                lacking.append(f"TensorRT-LLM importable by {python} (pip install tensorrt-llm from NVIDIA's "
                               f"index, or set {TRTLLM_PYTHON_ENV} to a Python that has it)")
            elif lacking:
                lacking.append(f"TensorRT-LLM (in {python} or the Python named by {TRTLLM_PYTHON_ENV})")
        else:
            lacking.append(f"unknown requirement {need!r}")
    return lacking
