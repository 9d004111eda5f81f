"""GPUs and machines: which GPUs can run which formats, and what this machine has.

- **GPUs in recipes** (pure data and arithmetic, no torch): NVIDIA compute capabilities, memory
  bandwidths and tensor-core peaks of common serving GPUs (the report's speed estimates use the
  last two). The recipe schema validates target names against them, the planner compares each
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
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GPU:
    """A serving GPU's published figures (NVIDIA's datasheets; dense tensor-core peaks, not the
    sparse ones the datasheets print first).

    Attributes:
        compute_capability: NVIDIA's compute capability (which formats its kernels run).
        bandwidth_gbs: memory bandwidth, GB/s (what batch-1 decoding is bound by).
        peak_tflops: dense tensor-core peak per matmul precision (``16-bit``: BF16, or FP16 where
            the GPU has no BF16, with FP32 accumulation; ``fp8``; ``int8`` in TOPS; ``fp4``); a
            precision the GPU lacks, or whose figure is not published, is absent.
        source: where the figures come from; ``uncertain`` marks figures not confirmed against
            a datasheet (the estimates that use them say so).
    """

    compute_capability: float
    bandwidth_gbs: float | None = None
    peak_tflops: dict[str, float] = field(default_factory=dict)
    source: str = ""


_HOPPER = {"16-bit": 989.0, "fp8": 1979.0, "int8": 1979.0}
# The GPUs a recipe may name, in the order messages list them.
GPUS: dict[str, GPU] = {
    "V100": GPU(7.0, 900, {"16-bit": 125}, "V100 datasheet (SXM2; FP16, no BF16 or INT8 tensor cores)"),
    "T4": GPU(7.5, 320, {"16-bit": 65, "int8": 130}, "T4 datasheet (FP16 mixed precision; no BF16)"),
    "A100": GPU(8.0, 2039, {"16-bit": 312, "int8": 624}, "A100 datasheet (SXM 80GB; no FP8)"),
    "A30": GPU(8.0, 933, {"16-bit": 165, "int8": 330}, "A30 datasheet (uncertain: not re-checked)"),
    "A10": GPU(8.6, 600, {"16-bit": 125, "int8": 250}, "A10 datasheet"),
    # AWS publishes the A10G's bandwidth but no tensor-core peak: no prefill estimate.
    "A10G": GPU(8.6, 600, {}, "AWS G5 (bandwidth only; tensor peaks unpublished)"),
    "A40": GPU(8.6, 696, {"16-bit": 149.7, "int8": 299.3}, "A40 datasheet"),
    "RTX3090": GPU(8.6, 936, {"16-bit": 71, "int8": 284}, "GeForce RTX 3090 (Ampere whitepaper; FP32 accumulate)"),
    "L4": GPU(8.9, 300, {"16-bit": 121, "fp8": 242.5, "int8": 242.5}, "L4 datasheet"),
    "L40": GPU(8.9, 864, {"16-bit": 181, "fp8": 362, "int8": 362}, "L40 datasheet"),
    "L40S": GPU(8.9, 864, {"16-bit": 362, "fp8": 733, "int8": 733}, "L40S datasheet"),
    "RTX4090": GPU(8.9, 1008, {"16-bit": 165, "fp8": 330, "int8": 660},
                   "GeForce RTX 4090 (Ada whitepaper; FP32 accumulate)"),
    "H100": GPU(9.0, 3350, _HOPPER, "H100 datasheet (SXM5)"),
    "H200": GPU(9.0, 4800, _HOPPER, "H200 datasheet (SXM)"),
    "GH200": GPU(9.0, 4000, _HOPPER, "GH200 datasheet (96 GB HBM3 GPU; the 144 GB HBM3e one reads 4,900 GB/s)"),
    "B200": GPU(10.0, 8000, {"16-bit": 2250, "fp8": 4500, "int8": 4500, "fp4": 9000}, "HGX B200 datasheet"),
    "GB200": GPU(10.0, 8000, {"16-bit": 2500, "fp8": 5000, "int8": 5000, "fp4": 10000},
                 "GB200 NVL72 datasheet, per GPU (uncertain: derived from the rack's figures)"),
    # Blackwell Ultra trades INT8 for FP4; its INT8 and FP4 dense figures are not confirmed.
    "B300": GPU(10.3, 8000, {"16-bit": 2250, "fp8": 4500}, "HGX B300 (uncertain: figures not re-checked)"),
    "RTX5090": GPU(12.0, 1792, {"16-bit": 209.5, "fp8": 419, "int8": 838, "fp4": 1676},
                   "GeForce RTX 5090 (Blackwell whitepaper; FP32 accumulate; uncertain)"),
}
GPU_COMPUTE_CAPABILITY: dict[str, float] = {name: gpu.compute_capability for name, gpu in GPUS.items()}


def normalise_gpu(name: str) -> str:
    return name.upper().replace(" ", "").replace("-", "")


def compute_capability(name: str) -> float | None:
    return GPU_COMPUTE_CAPABILITY.get(normalise_gpu(name))


def gpu(name: str) -> GPU | None:
    return GPUS.get(normalise_gpu(name))


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


# -- how busy this machine is -------------------------------------------------------------------

# A measurement during which other processes kept more than this many cores busy on average
# is taken again, and flagged if it never gets quieter (speeds from a busy machine are not its own).
BUSY_CORES = 0.25


def busy_cpu_seconds() -> float | None:
    """CPU-seconds every core of this machine has spent busy since boot (``/proc/stat``'s
    aggregate line: everything but idle and iowait); None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU-seconds of this process and its finished children (the measured tool among them)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def other_cores(busy_before: float, busy_after: float, own_before: float, own_after: float, wall: float) -> float:
    """How many cores, on average over ``wall`` seconds, processes other than this one and its
    children kept busy (never below 0: the counters tick at different moments)."""
    if wall <= 0:
        return 0.0
    return max(0.0, ((busy_after - busy_before) - (own_after - own_before)) / wall)
