"""What this machine has, for stages that declare requirements (``Hints.requires``).

Checked, never assumed: the GPU architecture comes from ``nvidia-smi`` (the driver, so it works
whatever PyTorch build is installed), TensorRT-LLM from importing it in the Python that will run
the build. Results are remembered for the process.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys

from pipeline.compat import GPU_COMPUTE_CAPABILITY

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


DEVICES = ("auto", "cpu", "cuda")


def check_device(requested: str) -> str:
    """``--device`` checked before any stage runs (a stage would fail only after the fetch, with
    torch's own text); returns it normalised (``cuda`` or ``cuda:N`` for a GPU).

    Raises:
        InputError: an unknown device, or a CUDA device this machine's torch cannot use.
    """
    from pipeline.errors import InputError

    device = requested.strip().lower()
    kind, _, index = device.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise InputError(f"unknown device {requested!r}", where="--device", fix="use auto, cpu, cuda or cuda:N")
    if kind != "cuda":
        return device
    import torch

    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise InputError(f"--device {device} but {why} (torch {torch.__version__})", where="--device",
                         fix="use --device cpu or auto, or run on a machine with an NVIDIA GPU and a CUDA build of torch")
    if index and int(index) >= torch.cuda.device_count():
        raise InputError(f"--device {device} but this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                         where="--device", fix="choose an index below that")
    return device
