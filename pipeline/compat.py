"""Which GPUs can run which formats: NVIDIA compute capabilities of common serving GPUs.

Pure data (no torch): the recipe schema validates target names against it, and the planner
compares each variant's minimum compute capability (from its backend) with the recipe's targets.
"""

from __future__ import annotations

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
