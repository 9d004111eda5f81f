"""Speed estimates for variants whose engine did not run here (vLLM, TensorRT-LLM on GPUs):
batch-1 decode and prefill tokens/s on a named GPU, computed from the manifest and the GPU's
published figures (``pipeline.hardware.GPUS``). Every figure made here is an estimate and is
labelled so wherever it appears; a measured speed always takes its place when there is one.

The model (stated in every report that shows an estimate):

- **decode** is memory-bound at batch 1: every generated token reads each weight it multiplies
  through once (the variant's weight files, less an untied input embedding, of which a token reads
  one row) and the KV cache of ``CONTEXT`` tokens. tokens/s = ``MEMORY_EFFICIENCY`` × bandwidth ÷
  bytes per token. Small models decode slower than this (kernel launches, not bytes, bound them):
  for them it is an upper bound.
- **prefill** of a ``PROMPT``-token prompt is compute-bound: 2 FLOPs per matmul weight per token,
  plus attention's 4 × layers × heads × head_dim × ``PROMPT``/2 (causal), at the GPU's dense peak for
  the format's matmul precision (``FormatInfo.compute``): tokens/s = ``COMPUTE_EFFICIENCY`` × peak
  ÷ FLOPs per token.

The efficiencies are assumptions, not measurements: batch-1 decoding reaches 55-85 % of the memory
bandwidth in published measurements (gpt-fast on A100: 68.5 % in BF16), and prefill matmuls about
half the dense peak.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline import hardware

MEMORY_EFFICIENCY = 0.7
COMPUTE_EFFICIENCY = 0.5
CONTEXT = 1024  # decode: tokens already in the KV cache
PROMPT = 1024  # prefill: prompt length
_BYTES = {"16-bit": 2, "fp8": 1, "int8": 1}
WEIGHT_FILES = (".safetensors",)

MODEL = (f"estimate: batch 1; decode = {MEMORY_EFFICIENCY:g} × memory bandwidth ÷ (weight bytes a token reads + "
         f"KV cache of {CONTEXT} tokens); prefill of {PROMPT} tokens = {COMPUTE_EFFICIENCY:g} × the GPU's dense "
         "tensor peak for the format's matmul precision ÷ FLOPs per token; efficiencies assumed, GPU figures from "
         "NVIDIA's datasheets")


@dataclass(frozen=True)
class Estimate:
    """One variant's estimated speed on one GPU (``None`` figures: see ``why_not``)."""

    gpu: str
    decode_tps: float | None
    prefill_tps: float | None
    compute: str | None  # the matmul precision the prefill figure assumes
    why_not: str | None = None  # why a figure is missing
    uncertain: bool = False  # the GPU's figures are not confirmed against a datasheet
    kind: str = "estimate"


def bytes_per_token(manifest: dict[str, Any], context: int = CONTEXT) -> float | None:
    """Bytes a batch-1 decoding step reads: the weights a token multiplies through and the KV
    cache of ``context`` tokens (None: the manifest lacks the files or the serving shape)."""
    shape = manifest.get("architecture")
    files = [f for f in manifest.get("files") or [] if str(f.get("path", "")).endswith(WEIGHT_FILES)]
    if not shape or not files:
        return None
    weights = float(sum(f["size"] for f in files))
    if not shape["tied_embeddings"]:
        # Embeddings stay in the source's 16 bits in every GPU format modelbuild writes.
        weights -= 2 * shape["embedding_params"]
    kv_bytes = _BYTES.get((manifest.get("format") or {}).get("kv_cache", "16-bit"), 2)
    kv = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * kv_bytes * context
    return weights + kv


def flops_per_token(shape: dict[str, Any], prompt: int = PROMPT) -> float:
    attention = 4 * shape["layers"] * shape["attention_heads"] * shape["head_dim"] * prompt / 2
    return 2 * shape["matmul_params"] + attention


def unquantized(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest for the model in its 16 bits (the speed-ups' reference): every parameter in
    two bytes, matmuls in 16-bit, a 16-bit KV cache."""
    shape = manifest["architecture"]
    return {"architecture": shape, "format": {"compute": "16-bit", "kv_cache": "16-bit"},
            "files": [{"path": "model.safetensors", "size": 2 * shape["params"]}]}


def estimate(manifest: dict[str, Any], gpu_name: str) -> Estimate:
    """``manifest``'s variant on ``gpu_name`` (a name of ``hardware.GPUS``)."""
    gpu = hardware.gpu(gpu_name)
    if gpu is None:
        return Estimate(gpu_name, None, None, None, why_not=f"no figures for GPU {gpu_name}")
    name = hardware.normalise_gpu(gpu_name)
    uncertain = "uncertain" in gpu.source
    compute = (manifest.get("format") or {}).get("compute")
    read = bytes_per_token(manifest)
    if read is None or compute is None:
        return Estimate(name, None, None, compute, uncertain=uncertain,
                        why_not="the manifest lacks the serving shape or matmul precision (published before "
                                "modelbuild recorded them; republish to estimate)")
    decode = MEMORY_EFFICIENCY * gpu.bandwidth_gbs * 1e9 / read if gpu.bandwidth_gbs else None
    peak = gpu.peak_tflops.get(compute)
    prefill = COMPUTE_EFFICIENCY * peak * 1e12 / flops_per_token(manifest["architecture"]) if peak else None
    why = None if peak else f"no published {compute} tensor-core peak for {name}"
    return Estimate(name, decode, prefill, compute, why_not=why, uncertain=uncertain)
