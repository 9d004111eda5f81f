"""A test-only backend: round-to-nearest INT8 weight-only quantization, in torch on the CPU.

Every decoder Linear weight is quantized per output channel to INT8 with a power-of-two scale and
saved dequantized: ``q * 2**e`` with ``|q| <= 127`` needs at most 7 significant bits, so the
stored bf16 (or wider) value is exactly ``dequantize(q)``. The checkpoint is an ordinary
safetensors one of the source's architecture; no serving engine is claimed for it.

It proves that a backend is one module plus one catalogue line: the module declares its recipe
parameter model, its format and its distributions, and the standard chain (quantize, evaluate,
gate, publish) does the rest.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pipeline.backends.base import FormatInfo, Quantizer
from pipeline.recipe.variants import VariantBase

# The weights quantized: the decoder's Linear layers (embeddings, norms and the tied head stay).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RTNVariant(VariantBase):
    """INT8 weights per output channel (power-of-two scales), stored dequantized; test only."""

    backend: Literal["rtn"]
    bits: Literal[8] = 8


def quantize_dequantize(weight):
    """``weight`` rounded to INT8 per output row with power-of-two scales, in its own dtype.

    Returns:
        ``(dequantized weight, scales)``: the weight is exactly ``q * scale`` with ``|q| <= 127``.
    """
    import torch

    w = weight.float()
    absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    scale = torch.exp2(torch.ceil(torch.log2(absmax / 127)))
    q = torch.clamp(torch.round(w / scale), -127, 127)
    return (q * scale).to(weight.dtype), scale


class RTNBackend(Quantizer):
    name = "rtn"
    variant = RTNVariant
    distributions = (("torch", "torch"), ("safetensors", "safetensors"), ("transformers", "transformers"))
    extra = "dev"  # torch, safetensors and transformers are core dependencies; the tests run with [dev]

    def describe(self, variant: Any) -> FormatInfo:
        return FormatInfo(
            format="safetensors", scheme="RTN_INT8_POW2", weight_bits=8, engines=(), min_compute_capability=None,
            cpu_evaluation="weights: INT8 per channel (power-of-two scales) stored dequantized, loaded as stored; "
                           "activations: not quantized",
        )

    def quantize(self, variant: Any, source: Path, out: Path, *, calibration: Any, device: str) -> dict[str, Any]:
        from safetensors.torch import load_file, save_file

        quantized = 0
        for path in sorted(source.iterdir()):
            if not path.is_file():
                continue
            if path.suffix != ".safetensors":
                shutil.copyfile(path, out / path.name)
                continue
            tensors = load_file(str(path))
            for name, tensor in tensors.items():
                if name.endswith(".weight") and name.rsplit(".", 2)[-2] in TARGETS:
                    tensors[name] = quantize_dequantize(tensor)[0]
                    quantized += 1
            save_file(tensors, str(out / path.name), metadata={"format": "pt"})
        return {"quantized_modules": quantized}

    def load_for_eval(self, path: Path, device: str) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
