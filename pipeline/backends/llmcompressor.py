"""vLLM's formats through llm-compressor, saved as compressed-tensors.

Quantization loads the model in fp32 (bf16 matmuls are ~5x slower on CPUs without bf16 units),
runs ``oneshot`` with a preset scheme, casts what stays unquantized back to the source dtype and
saves compressed; llm-compressor writes its own ``recipe.yaml`` beside the weights.

Evaluation loads the checkpoint through transformers' compressed-tensors integration with
``run_compressed=False``: every weight is dequantized once, exactly as stored (q * scale). The
per-forward weight fake-quantization is then switched off (it would only redo that work), and the
activation quantization the engine performs (e.g. FP8 per-token dynamic) is simulated with
compressed-tensors' own ``forward_quantize`` on each quantized layer's input.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from pipeline.backends.base import Backend, FormatInfo
from pipeline.errors import StageError

_SCHEMES: dict[str, dict[str, Any]] = {
    "FP8_DYNAMIC": {
        "weight_bits": 8,
        # vLLM runs FP8 W8A8 GEMMs on Ada/Hopper and newer (compute capability 8.9+).
        "min_cc": 8.9,
        "cpu_evaluation": "weights: stored FP8 (E4M3, per-channel scales) dequantized exactly; input "
        "activations: FP8 per-token dynamic quantization simulated in fp32 (the engine runs FP8 GEMMs)",
    },
}

# Parameters that must keep their own dtype when the rest is cast back to the source dtype.
_KEEP_DTYPE = ("global_scale",)


class LLMCompressorBackend(Backend):
    name = "llmcompressor"
    distributions = (
        ("llmcompressor", "llmcompressor"),
        ("compressed_tensors", "compressed-tensors"),
        ("transformers", "transformers"),
        ("torch", "torch"),
    )
    extra = "llmcompressor"

    def describe(self, variant: Any) -> FormatInfo:
        info = _SCHEMES[variant.scheme]
        return FormatInfo(
            format="compressed-tensors",
            scheme=variant.scheme,
            weight_bits=info["weight_bits"],
            engines=("vllm",),
            min_compute_capability=info["min_cc"],
            serve={"vllm": "vllm serve {path}"},
            cpu_evaluation=info["cpu_evaluation"],
        )

    def quantize(self, variant: Any, source: Path, out: Path, *, calibration: Any, device: str) -> dict[str, Any]:
        import torch
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source_dtype = _config_dtype(source)
        # Data-free schemes run no forward pass, so they work in the checkpoint's own dtype (as
        # llm-compressor's examples do); calibrated ones run forwards and use fp32 on CPUs,
        # where bf16 matmuls are ~5x slower.
        work_dtype = source_dtype if not variant.needs_calibration() or device != "cpu" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(source, dtype=work_dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(source)
        modifier = QuantizationModifier(
            targets=list(variant.targets), scheme=variant.scheme, ignore=list(variant.ignore)
        )
        try:
            with _quiet_library_logs():
                oneshot(model=model, recipe=modifier)
        except (ValueError, RuntimeError) as e:
            raise StageError(f"llm-compressor failed on scheme {variant.scheme}: {e}") from e
        quantized = sum(1 for m in model.modules() if getattr(m, "quantization_scheme", None) is not None)
        if quantized == 0:
            raise StageError(
                f"no module matched targets {list(variant.targets)} (ignore {list(variant.ignore)})",
                fix="check the variant's targets/ignore against the model's module names",
            )
        # Back to the source dtype before the compressed save: unquantized tensors (embeddings,
        # norms, ignored layers) so only quantization changes the checkpoint, and scales too, as a
        # bf16 model quantized on a GPU would have them (compression then uses those very scales).
        # FP4 global scales must stay fp32.
        with torch.no_grad():
            for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
                if tensor.dtype == torch.float32 and not any(k in name for k in _KEEP_DTYPE):
                    tensor.data = tensor.data.to(source_dtype)
        model.save_pretrained(out, save_compressed=True)
        tokenizer.save_pretrained(out)
        if not (out / "recipe.yaml").is_file():
            raise StageError("llm-compressor did not write recipe.yaml beside the checkpoint")
        return {"quantized_modules": quantized, "source_dtype": str(source_dtype).removeprefix("torch.")}

    def load_for_eval(self, path: Path, device: str) -> Any:
        import torch
        from compressed_tensors.quantization import forward_quantize
        from transformers import AutoModelForCausalLM
        from transformers.utils.quantization_config import CompressedTensorsConfig

        with warnings.catch_warnings():
            # transformers warns that the passed config overrides only run_compressed: intended.
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)
            ).to(device)
        simulated = 0
        shared = _SharedInputQDQ(forward_quantize)
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            # Weights are already dequantized; skip compressed-tensors' per-forward weight QDQ.
            module.quantization_enabled = False
            if scheme.input_activations is not None:
                module.register_forward_pre_hook(_input_qdq(shared, scheme.input_activations))
                simulated += 1
            if scheme.output_activations is not None:
                module.register_forward_hook(_output_qdq(forward_quantize, scheme.output_activations))
        model.eval()
        model.modelbuild_simulated_layers = simulated
        return model


class _SharedInputQDQ:
    """Dynamic activation quantization depends only on the input tensor and the quantization
    args, so layers fed the very same tensor (q/k/v projections, gate/up) share one result, as
    engines that fuse those layers quantize their input once. Static or per-module-scaled inputs
    are never shared."""

    def __init__(self, forward_quantize):
        self.forward_quantize = forward_quantize
        self.last: tuple | None = None

    def __call__(self, module, x, args):
        shareable = args.dynamic is True and getattr(module, "input_global_scale", None) is None
        if not shareable:
            return self.forward_quantize(module, x, "input", args)
        last = self.last
        # Holding the input keeps its storage alive, so identity plus version is a safe test.
        if last is not None and last[0] is x and last[1] == x._version and last[2] == args:
            return last[3]
        if x.ndim == 3 and _is_fp8_per_token(args):
            out = fp8_per_token_qdq(x)
        else:
            out = self.forward_quantize(module, x, "input", args)
        self.last = (x, x._version, args, out)
        return out


def _is_fp8_per_token(args) -> bool:
    return (
        args.type == "float" and args.num_bits == 8 and args.strategy == "token" and args.symmetric
        and args.scale_dtype is None and args.group_size is None
    )


def fp8_per_token_qdq(x):
    """FP8 (E4M3) per-token dynamic quantize-dequantize of a ``[batch, seq, hidden]`` tensor.

    The same arithmetic as compressed-tensors' ``forward_quantize`` for these args (scale =
    absmax / 448, zero scales replaced by fp32 eps, clamp, cast, multiply back), with fewer
    temporaries: it is the evaluation's hot loop. A test pins it bit for bit to the library's.
    """
    import torch

    fp8 = torch.float8_e4m3fn
    limit = torch.finfo(fp8).max
    scale = x.abs().amax(dim=-1, keepdim=True) / limit
    scale = torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale)
    q = (x / scale).clamp_(-limit, limit).to(fp8)
    return q.to(x.dtype).mul_(scale)


def _input_qdq(shared: _SharedInputQDQ, args):
    def hook(module, inputs):
        return (shared(module, inputs[0], args),) + tuple(inputs[1:])

    return hook


def _output_qdq(forward_quantize, args):
    def hook(module, _inputs, output):
        return forward_quantize(module, output, "output", args)

    return hook


@contextlib.contextmanager
def _quiet_library_logs():
    """llm-compressor logs every lifecycle step at INFO through loguru; keep the run's output
    readable unless MODELBUILD_DEBUG=1."""
    if os.environ.get("MODELBUILD_DEBUG") == "1":
        yield
        return
    from loguru import logger

    logger.disable("llmcompressor")
    try:
        yield
    finally:
        logger.enable("llmcompressor")


def _config_dtype(folder: Path):
    import torch

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)
