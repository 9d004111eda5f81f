"""Which GPUs can run which formats: NVIDIA compute capabilities of common serving GPUs.

Pure data and arithmetic (no torch): the recipe schema validates target names against it, the
planner compares each variant's GPU needs (from its backend) with the recipe's targets and checks
that a model can be split the way a target asks.
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
