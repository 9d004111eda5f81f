"""vLLM's formats through llm-compressor, saved as compressed-tensors.

Quantization builds llm-compressor's own recipe from the variant (a preset scheme, optionally
with a group size; round-to-nearest ``QuantizationModifier``, ``GPTQModifier``, or ``AWQModifier``
before quantization; ``SmoothQuantModifier`` first for W8A8), runs ``oneshot`` on the calibration
samples, casts what stays unquantized back to the source dtype and saves compressed;
llm-compressor writes its own ``recipe.yaml`` beside the weights. The model is held in host memory
in its stored dtype. Calibrated schemes run llm-compressor's sequential pipeline, which onloads
one decoder layer at a time to the execution device: on a GPU the layer computes in the stored
dtype; on CPUs (bf16 matmuls ~5x slower there) in fp32, one layer's fp32 copy at a time, which
writes the same checkpoint as a model loaded whole in fp32 (``_fp32_layer_by_layer``). Data-free
work stays in the checkpoint's dtype.

Evaluation loads the checkpoint through transformers' compressed-tensors integration with
``run_compressed=False``: every weight is dequantized once. compressed-tensors decompresses FP4
weights into the checkpoint's dtype (bf16), which rounds ``q * scale / global_scale``; the stored
quantized values are recovered exactly from that (the rounding is far below half a quantization
step) by one quantize-dequantize with the stored scales in fp32, so every weight is exactly
``dequantize(q)``. The per-forward weight fake-quantization is then switched off (it would only
redo that work), and the activation quantization the engine performs (FP8/INT8 per token, static
FP8, NVFP4/MXFP4 groups) is simulated on each quantized layer's input with compressed-tensors'
arithmetic (``simulated_activations``: the library's ``forward_quantize``, or faster functions
pinned bit for bit to it).

The module also holds the recipe's parameter model of these variants (``LLMCompressorVariant``) and
the one scheme table (``SCHEMES``) that both its validation and the quantizer read.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.backends.base import FormatInfo, Quantizer
from pipeline.backends.shapes import (
    architecture,
    config_dtype,
    fused_experts,
    linear_input_widths,
    weight_owners,
)
from pipeline.backends.simulated_activations import (
    SharedInputQDQ,
    input_hook,
    output_hook,
)
from pipeline.errors import StageError
from pipeline.recipe.variants import Strict, VariantBase, check_regex

_W16 = "weights: stored {w} dequantized exactly; activations: not quantized (16-bit in the engine, fp32 here)"
# The llm-compressor / compressed-tensors preset names modelbuild builds, evaluates and records
# (whether the installed compressed-tensors has a preset is checked at plan time): the recipe's
# ``scheme`` choices, in this order.
# min_cc: lowest compute capability on which vLLM runs the format's own kernels
# (llm-compressor's scheme guide: INT W4A16/W8A16/W8A8 7.5, FP8 8.9, FP4 10.0); compute: the
# precision of vLLM's matmuls (``FormatInfo.compute``).
SCHEMES: dict[str, dict[str, Any]] = {
    # FP8 weights per channel, FP8 activations per token (dynamic)
    "FP8_DYNAMIC": {"compute": "fp8", "streamed": True, "bits": 8, "min_cc": 8.9, "eval": "weights: stored FP8 (E4M3, per-channel scales) "
                    "dequantized exactly; input activations: FP8 per-token dynamic quantization simulated in fp32"},
    # FP8 weights per tensor, FP8 activations per tensor (static, calibrated)
    "FP8": {"compute": "fp8", "streamed": True, "bits": 8, "min_cc": 8.9, "eval": "weights: stored FP8 (E4M3, per-tensor scale) dequantized exactly; "
            "input activations: FP8 with the calibrated static per-tensor scales, simulated in fp32"},
    # INT8 weights per channel, INT8 activations per token (dynamic)
    "W8A8": {"compute": "int8", "streamed": False, "bits": 8, "min_cc": 7.5, "eval": "weights: stored INT8 (per-channel scales) dequantized exactly; "
             "input activations: INT8 per-token dynamic quantization simulated in fp32"},
    # INT8 weights per group, 16-bit activations
    "W8A16": {"compute": "16-bit", "streamed": True, "bits": 8, "min_cc": 7.5, "eval": _W16.format(w="INT8 (per-group scales)")},
    # INT4 weights per group (symmetric), 16-bit activations
    "W4A16": {"compute": "16-bit", "streamed": True, "bits": 4, "min_cc": 7.5, "eval": _W16.format(w="INT4 (per-group scales)")},
    # INT4 weights per group with zero points
    "W4A16_ASYM": {"compute": "16-bit", "streamed": True, "bits": 4, "min_cc": 7.5, "eval": _W16.format(w="INT4 (per-group scales and zero points)")},
    # FP4 (E2M1) weights, FP8 scales per 16, fp32 global scale
    "NVFP4A16": {"compute": "16-bit", "streamed": True, "bits": 4, "min_cc": 10.0, "eval": _W16.format(w="FP4 (E2M1, FP8 scales per 16, fp32 global scale)")},
    # NVFP4 weights and activations (calibrated global input scales)
    "NVFP4": {"compute": "fp4", "streamed": True, "bits": 4, "min_cc": 10.0, "eval": "weights: stored NVFP4 dequantized exactly; input activations: "
              "NVFP4 (FP8 scales per 16 computed per token group, calibrated global scale) simulated in fp32"},
    # FP4 weights, E8M0 scales per 32
    "MXFP4A16": {"compute": "16-bit", "streamed": True, "bits": 4, "min_cc": 10.0, "eval": _W16.format(w="MXFP4 (E2M1, E8M0 scales per 32)")},
    # MXFP4 weights and activations
    "MXFP4": {"compute": "fp4", "streamed": True, "bits": 4, "min_cc": 10.0, "eval": "weights: stored MXFP4 dequantized exactly; input activations: "
              "MXFP4 (E8M0 scales per 32, dynamic) simulated in fp32"},
}
_KV_EVAL = ("; KV cache: FP8 with the calibrated per-tensor k/v scales, applied to post-RoPE keys and values by "
            "compressed-tensors' own KV-cache hooks")
# The KV-cache scheme llm-compressor calibrates for ``kv_cache_scheme: fp8`` (its FP8 KV example's):
# FP8 E4M3, one static symmetric scale per tensor (vLLM reads k_scale/v_scale per attention layer).
FP8_KV_CACHE = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
# "streamed": evaluated a layer at a time from the files (W8A8's int-quantized format is loaded
# whole: see _WHOLE_MODEL_FORMATS).
# Schemes whose activation quantization needs observed ranges (static or global scales).
CALIBRATED_ACTIVATIONS = ("FP8", "NVFP4")
# Schemes whose weight group size a recipe may set (the FP4 formats fix theirs: 16 or 32).
GROUP_SIZE_SCHEMES = ("W8A16", "W4A16", "W4A16_ASYM")
INT_WEIGHT_ONLY = ("W8A16", "W4A16", "W4A16_ASYM")


class GPTQOptions(Strict):
    """llm-compressor ``GPTQModifier`` settings."""

    dampening_frac: float = Field(0.01, gt=0.0, le=1.0)
    actorder: Literal["static", "group", "weight"] | None = Field(
        "static", description="activation ordering; null turns it off"
    )
    block_size: int = Field(128, ge=1, le=4096)


class AWQOptions(Strict):
    """llm-compressor ``AWQModifier`` settings (a smaller ``n_grid`` searches fewer scales)."""

    n_grid: int = Field(20, ge=2, le=100)
    duo_scaling: bool | Literal["both"] = True

    @model_validator(mode="after")
    def _grid_fits(self) -> AWQOptions:
        # llm-compressor divides by n_grid - 2 (duo_scaling true) or n_grid/2 - 1 ("both").
        least = {True: 3, "both": 4}.get(self.duo_scaling, 2)
        if self.n_grid < least:
            raise ValueError(f"n_grid must be at least {least} with duo_scaling {self.duo_scaling}")
        return self


class SmoothQuantOptions(Strict):
    """llm-compressor ``SmoothQuantModifier`` settings (applied before quantization)."""

    smoothing_strength: float = Field(0.8, gt=0.0, lt=1.0)


class LLMCompressorVariant(VariantBase):
    """A compressed-tensors checkpoint made by llm-compressor, served by vLLM."""

    backend: Literal["llmcompressor"]
    scheme: Literal[tuple(SCHEMES)] = Field(  # type: ignore[valid-type]
        description="llm-compressor preset scheme name"
    )
    algorithm: Literal["rtn", "gptq", "awq"] = Field(
        "rtn", description="rtn: round to nearest (QuantizationModifier); gptq; awq"
    )
    group_size: int | None = Field(None, ge=8, le=4096, description="weight group size (INT schemes)")
    gptq: GPTQOptions | None = None
    awq: AWQOptions | None = None
    smoothquant: SmoothQuantOptions | None = None
    ignore: tuple[str, ...] = Field(("lm_head",), description="modules left unquantized")
    targets: tuple[str, ...] = Field(("Linear",), description="module types to quantize")
    kv_cache_scheme: Literal["none", "fp8"] = Field(
        "none", description="fp8: an FP8 KV cache with per-tensor k/v scales calibrated by llm-compressor, as vLLM loads them",
    )
    entrypoint: Literal["oneshot", "model_free"] = Field(
        "oneshot",
        description="oneshot: the model in memory; model_free: llm-compressor's model_free_ptq, shard by "
        "shard, memory independent of model size (data-free round-to-nearest schemes only)",
    )

    @field_validator("ignore", "targets")
    @classmethod
    def _patterns_compile(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # llm-compressor compiles `re:` patterns only when it walks the model, deep in the
        # quantize stage: a typo there must fail when the recipe is read.
        for pattern in value:
            if not pattern:
                raise ValueError("empty module name")
            if pattern.startswith("re:"):
                check_regex(pattern[3:], pattern)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LLMCompressorVariant:
        if self.entrypoint == "model_free" and self.needs_calibration():
            raise ValueError("entrypoint model_free takes data-free round-to-nearest variants only (no calibration)")
        if self.group_size is not None and self.scheme not in GROUP_SIZE_SCHEMES:
            raise ValueError(
                f"group_size applies to {', '.join(GROUP_SIZE_SCHEMES)}; {self.scheme} fixes its own grouping"
            )
        if self.gptq is not None and self.algorithm != "gptq":
            raise ValueError("'gptq' options need algorithm: gptq")
        if self.awq is not None and self.algorithm != "awq":
            raise ValueError("'awq' options need algorithm: awq")
        if self.algorithm == "awq" and self.scheme not in INT_WEIGHT_ONLY:
            raise ValueError(f"algorithm awq applies to weight-only INT schemes ({', '.join(INT_WEIGHT_ONLY)})")
        if self.smoothquant is not None and self.scheme != "W8A8":
            raise ValueError("smoothquant applies to W8A8 (it moves activation outliers into weights)")
        return self

    def backend_params(self) -> dict:
        params = super().backend_params()
        if self.kv_cache_scheme == "none":
            params.pop("kv_cache_scheme")  # the bytes of variants without one, keyed as before it existed
        if self.smoothquant is not None or self.algorithm == "awq":
            # Smoothing is its own llm-compressor pass; its rewritten weights are held in the
            # stored dtype until the quantizing pass (``_fp32_layer_by_layer``), which rounds
            # them differently from a model held whole in fp32: other bytes, another key.
            params["smoothed_weights"] = "stored dtype between passes"
        return params

    def needs_calibration(self) -> bool:
        return (
            self.algorithm in ("gptq", "awq")
            or self.smoothquant is not None
            or self.scheme in CALIBRATED_ACTIVATIONS
            or self.kv_cache_scheme != "none"  # the k/v scales are observed on calibration data
        )

# Parameters that must keep their own dtype when the rest is cast back to the source dtype.
_KEEP_DTYPE = ("global_scale",)


class LLMCompressorBackend(Quantizer):
    name = "llmcompressor"
    variant = LLMCompressorVariant
    distributions = (
        ("llmcompressor", "llmcompressor"),
        ("compressed_tensors", "compressed-tensors"),
        ("transformers", "transformers"),
        ("torch", "torch"),
    )
    extra = "llmcompressor"

    def describe(self, variant: Any) -> FormatInfo:
        info = SCHEMES[variant.scheme]
        return FormatInfo(
            format="compressed-tensors",
            scheme=variant.scheme,
            weight_bits=info["bits"],
            engines=("vllm",),
            min_compute_capability=info["min_cc"],
            serve={"vllm": "vllm serve {path}"},
            cpu_evaluation=info["eval"] + (_KV_EVAL if variant.kv_cache_scheme == "fp8" else ""),
            compute=info["compute"],
            kv_cache="fp8" if variant.kv_cache_scheme == "fp8" else "16-bit",
        )

    def check_variant(self, variant: Any, model_config: Any) -> None:
        """The installed compressed-tensors has the scheme; the checkpoint can be evaluated; its
        grouping fits every targeted layer.

        Raises:
            RecipeError: naming the scheme, or the architecture whose checkpoint cannot be loaded
                back, or the first layer whose input width the group size does not divide, with a
                group size that would fit.
        """
        from pipeline.errors import RecipeError

        try:
            from compressed_tensors.quantization import preset_name_to_scheme
            from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
        except ImportError:
            return  # check_environment reports the missing library
        if variant.scheme not in PRESET_SCHEMES:
            raise RecipeError(
                f"scheme {variant.scheme} is not supported by the installed compressed-tensors "
                f"{_version('compressed-tensors')} (llm-compressor {_version('llmcompressor')})",
                field="scheme",
                fix=f"choose one of {', '.join(sorted(set(SCHEMES) & set(PRESET_SCHEMES)))}",
            )
        if model_config is not None:
            experts = fused_experts(model_config)
            if experts:
                # llm-compressor unfuses the experts to quantize them (its linearized MoE) and saves
                # them per expert; transformers, which evaluation loads them with, refuses such a
                # compressed checkpoint for its fused experts (measured: transformers 5.14.1,
                # Qwen3-MoE and Mixtral), so the run would fail at evaluation.
                raise RecipeError(
                    f"llm-compressor {variant.scheme} of the mixture-of-experts architecture "
                    f"{architecture(model_config)}: transformers {_version('transformers')} cannot load its "
                    f"per-expert compressed checkpoint back into {', '.join(experts)} for evaluation",
                    field="scheme", fix="use backend llamacpp (GGUF) for this model",
                )
        weights = preset_name_to_scheme(variant.scheme, list(variant.targets)).weights
        group = variant.group_size or (weights.group_size if weights is not None else None)
        if not group or model_config is None:
            return
        widths = linear_input_widths(model_config, variant.ignore)
        bad = [(name, width) for name, width in widths if width % group]
        if bad:
            fits = [g for g in (128, 64, 32, 16) if all(w % g == 0 for _n, w in widths)]
            name, width = bad[0]
            raise RecipeError(
                f"group size {group} does not divide {name}'s {width} input features "
                f"({len(bad)} layer(s) affected)",
                field="group_size",
                fix=f"use group_size: {fits[0]}" if fits and variant.scheme in ("W4A16", "W4A16_ASYM", "W8A16")
                else "ignore those layers or choose another scheme",
            )

    def quantize(self, variant: Any, source: Path, out: Path, *, calibration: Any, device: str) -> dict[str, Any]:
        import torch
        from llmcompressor import oneshot
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source_dtype = config_dtype(source)
        if variant.entrypoint == "model_free":
            return _model_free(variant, source, out, device, source_dtype)
        # The model stays in host memory in the checkpoint's own dtype. Data-free schemes run no
        # forward pass and work in that dtype (as llm-compressor's examples do). Calibrated ones
        # run llm-compressor's sequential pipeline, which onloads one layer at a time to the
        # execution device: a GPU computes in the stored dtype; on CPUs, where bf16 matmuls are
        # ~5x slower, each layer is computed in fp32 (``_fp32_layer_by_layer``).
        model = AutoModelForCausalLM.from_pretrained(source, dtype=source_dtype)
        if calibration is None:
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(source)
        kwargs: dict[str, Any] = {}
        if calibration is not None:
            from datasets import Dataset

            kwargs = {
                "dataset": Dataset.from_dict(
                    {"input_ids": calibration, "attention_mask": [[1] * len(ids) for ids in calibration]}
                ),
                "num_calibration_samples": len(calibration),
                "max_seq_length": max(len(ids) for ids in calibration),
                "shuffle_calibration_samples": False,  # the samples are already seeded picks
            }
        try:
            with _quiet_library_logs(), _threads_for(variant, device, model.config), _no_pinning_without_accelerator(), \
                    _layer_progress(model, calibrated=calibration is not None), \
                    _fp32_layer_by_layer(model, active=calibration is not None and device == "cpu"):
                oneshot(model=model, recipe=_modifiers(variant), **kwargs)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise StageError(f"llm-compressor failed on {variant.scheme}/{variant.algorithm}: {e}") from e
        from compressed_tensors.offload import remove_dispatch

        remove_dispatch(model)  # plain tensors again (the pipeline offloaded every module)
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
        return {
            "quantized_modules": quantized,
            "source_dtype": str(source_dtype).removeprefix("torch."),
            "calibration_samples": 0 if calibration is None else len(calibration),
        }

    def load_for_eval(self, path: Path, device: str) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        with warnings.catch_warnings():
            # transformers warns that the passed config overrides only run_compressed: intended.
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                         quantization_config=_decompressed()).to(device)
        for module in _quantized(model):
            _exact_fp32(module)
        return _checked_kv_cache(_simulate_activations(model.eval()), path)

    def memory(self, variant: Any) -> dict[str, str | None]:
        if variant.entrypoint == "model_free":
            quantize = "shard"
        else:  # calibrated work computes a layer at a time in fp32 (``_fp32_layer_by_layer``)
            quantize = "layered" if variant.needs_calibration() else "whole-stored"
        return {"quantize": quantize, "evaluate": "streamed" if SCHEMES[variant.scheme]["streamed"] else "whole-fp32"}

    def scores(self, path: Path, windows, device: str, scratch: Path) -> Iterator:
        """Layer by layer from the files: each quantized layer's stored tensors are decompressed by
        compressed-tensors' own compressor for its format as the layer is materialised (the same
        values as ``load_for_eval``)."""
        import torch
        from transformers.utils.quantization_config import CompressedTensorsConfig

        from pipeline.quality.streamed import load_offloaded, streamed_logprobs

        if _formats(path) & _WHOLE_MODEL_FORMATS:
            yield from super().scores(path, windows, device, scratch)
            return

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            # run_compressed: the skeleton keeps the stored (compressed) parameters, which
            # _load_decompressed decompresses layer by layer; decompressing at load time would
            # need every weight in memory.
            model, weights = load_offloaded(path, dtype=torch.float32, device=device, offload_folder=scratch,
                                            quantization_config=CompressedTensorsConfig(run_compressed=True),
                                            load_module=_load_decompressed)
        # The library would decompress the whole model on the first forward: the layers are
        # decompressed one at a time instead.
        model.hf_quantizer.compressor.remove_decompression_hook(model)
        model = _checked_kv_cache(_simulate_activations(model.eval()), path)
        yield from streamed_logprobs(model, windows, device, weights, scratch=scratch)


# transformers 5.14 initialises the offloaded integer weights of these formats with a float
# initialiser while loading (and fails): they are scored from the whole model in memory.
_WHOLE_MODEL_FORMATS = {"int-quantized"}


def _formats(path: Path) -> set[str]:
    """The compressed-tensors formats of a checkpoint's config groups."""
    import json

    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("quantization_config", {})
    groups = config.get("config_groups", {}).values()
    return ({g.get("format") for g in groups} | {config.get("format")}) - {None}


def _checked_kv_cache(model, path: Path):
    """The model, once it is known to quantize its KV cache if the checkpoint says it does.

    Raises:
        StageError: the checkpoint has a KV-cache scheme but no attention module took it (the
            figures would be those of a 16-bit cache).
    """
    import json

    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("quantization_config", {})
    if config.get("kv_cache_scheme") and not model.modelbuild_kv_cache_layers:
        raise StageError(f"{path} has a KV-cache scheme, but compressed-tensors attached it to no attention layer")
    return model


def _decompressed():
    from transformers.utils.quantization_config import CompressedTensorsConfig

    return CompressedTensorsConfig(run_compressed=False)


def _quantized(model) -> list:
    return [m for m in model.modules() if getattr(getattr(m, "quantization_scheme", None), "weights", None) is not None]


def _exact_fp32(module) -> None:
    """A weight decompressed into bf16 (FP4) recovered exactly in fp32 (see the module docstring),
    and compressed-tensors' per-forward weight QDQ switched off (the weight is dequantized)."""
    import torch
    from compressed_tensors.quantization import fake_quantize

    if module.weight.dtype != torch.float32:
        with torch.no_grad():
            module.weight.data = fake_quantize(
                module.weight.data.float(), module.weight_scale, getattr(module, "weight_zero_point", None),
                module.quantization_scheme.weights, g_idx=getattr(module, "weight_g_idx", None),
                global_scale=getattr(module, "weight_global_scale", None),
            )
    module.quantization_enabled = False


def _load_decompressed(module, stored: dict[str, Any], device: str) -> bool:
    """``StreamedWeights``' loader for a quantized layer: its stored tensors through the
    compressor of its format, as ``from_pretrained`` would decompress them."""
    import torch
    from compressed_tensors.compressors import BaseCompressor

    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.weights is None or not stored:
        return False
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    # Scales in fp32, as from_pretrained(dtype=float32) casts them: the dense weights then match
    # load_for_eval's bit for bit (packed integers and FP8 values stay as stored).
    stored = {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in stored.items()}
    for name, value in compressor.decompress(stored, scheme).items():
        module.register_parameter(name, torch.nn.Parameter(value.to(device), requires_grad=False))
    for name in [n for n, p in module.named_parameters(recurse=False) if p.device.type == "meta"]:
        delattr(module, name)  # compressed forms (packed weights, shapes) the dense module no longer has
    _exact_fp32(module)
    return True


def _simulate_activations(model):
    """The engine's activation quantization simulated on each quantized layer's input (and
    output, where the scheme quantizes it); records how many layers are simulated.

    Attention modules of a checkpoint with a KV-cache scheme carry compressed-tensors' own
    ``QuantizedKVCache``, which quantize-dequantizes the post-RoPE keys and values with the
    stored k/v scales on every forward: it is left on (the library's arithmetic), and counted."""
    from compressed_tensors.modeling.kvcache import KV_CACHE_ATTR
    from compressed_tensors.quantization import forward_quantize

    simulated = kv_layers = 0
    shared = SharedInputQDQ(forward_quantize)
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        if hasattr(module, KV_CACHE_ATTR):
            module.quantization_enabled = True
            kv_layers += 1
            continue
        module.quantization_enabled = False
        if scheme.input_activations is not None:
            module.register_forward_pre_hook(input_hook(shared, scheme.input_activations))
            simulated += 1
        if scheme.output_activations is not None:
            module.register_forward_hook(output_hook(forward_quantize, scheme.output_activations))
    model.modelbuild_simulated_layers = simulated
    model.modelbuild_kv_cache_layers = kv_layers
    return model


def _scheme(variant):
    """The preset scheme, with the variant's group size if it sets one."""
    from compressed_tensors.quantization import preset_name_to_scheme

    scheme = preset_name_to_scheme(variant.scheme, list(variant.targets))
    if variant.group_size is not None:
        scheme = scheme.model_copy(update={"weights": scheme.weights.model_copy(update={"group_size": variant.group_size})})
    return scheme


def _model_free(variant, source: Path, out: Path, device: str, source_dtype) -> dict[str, Any]:
    """llm-compressor's ``model_free_ptq``: safetensors shard by shard, no model in memory.

    It matches tensors by name only, so every weight that is not a targeted Linear (embeddings,
    and the output head when tied to them) is named in ``ignore`` explicitly, from a weightless
    (meta) instance of the architecture.
    """
    from llmcompressor.entrypoints.model_free import model_free_ptq
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    targeted = {name for name, _w in linear_input_widths(config, variant.ignore)}
    others = sorted(weight_owners(config) - targeted)
    # model_free_ptq builds a torch.nn.Linear per weight and overwrites it at once: its random
    # initialisation was ~30% of the CPU time (measured), so it is skipped the way transformers
    # skips it when loading a checkpoint. The output is unchanged (tested against oneshot).
    with _quiet_library_logs(), _no_init_weights():
        model_free_ptq(
            str(source), str(out), scheme=_scheme(variant), ignore=list(variant.ignore) + others,
            max_workers=max(1, os.cpu_count() or 1) if device == "cpu" else 1,
            device=None if device == "cpu" else device,
        )
    # model_free_ptq copies the source's non-weight files (config, tokenizer) and updates config.
    return {"quantized_modules": len(targeted), "source_dtype": str(source_dtype).removeprefix("torch."),
            "calibration_samples": 0, "entrypoint": "model_free_ptq"}


def _no_init_weights():
    from transformers.initialization import no_init_weights

    return no_init_weights()


def _modifiers(variant) -> list:
    """llm-compressor's recipe for a variant, as a list of modifiers."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    scheme = _scheme(variant)
    common: dict[str, Any] = {"config_groups": {"group_0": scheme}, "ignore": list(variant.ignore)}
    if variant.kv_cache_scheme == "fp8":
        common["kv_cache_scheme"] = dict(FP8_KV_CACHE)
    mods: list = []
    if variant.smoothquant is not None:
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        mods.append(SmoothQuantModifier(smoothing_strength=variant.smoothquant.smoothing_strength))
    if variant.algorithm == "gptq":
        opts = variant.gptq or GPTQOptions()
        mods.append(GPTQModifier(**common, dampening_frac=opts.dampening_frac, actorder=opts.actorder,
                                 block_size=opts.block_size))
    elif variant.algorithm == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        opts = variant.awq or AWQOptions()
        mods.append(AWQModifier(n_grid=opts.n_grid, duo_scaling=opts.duo_scaling))
        mods.append(QuantizationModifier(**common))
    else:
        mods.append(QuantizationModifier(**common))
    return mods


@contextlib.contextmanager
def _no_pinning_without_accelerator():
    """llm-compressor 0.13's AWQ pins its activation cache unconditionally before each grid
    search, and ``Tensor.pin_memory()`` raises on machines without an accelerator. Pinning only
    speeds host-to-device copies, so with no accelerator it is skipped (nothing else changes)."""
    import torch

    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


@contextlib.contextmanager
def _layer_progress(model, *, calibrated: bool):
    """Layer k/L of llm-compressor's sequential pipeline as a step of the run's progress.

    The pipeline works one decoder layer (its sequential target) at a time: every calibration
    batch through layer k, the layer's compression (GPTQ, AWQ's and SmoothQuant's scales), its
    outputs propagated, and only then layer k+1 sees an input. So the first forward of layer k+1
    says k layers are finished, and oneshot's return says all are. Plain torch forward pre-hooks
    observe that (the traced subgraphs call the layers as modules) and change nothing; the
    layers are found the way the pipeline finds them. Data-free schemes run no forward pass: no
    layer step for them.
    """
    if not calibrated:
        yield
        return
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    from pipeline import progress

    targets = infer_sequential_targets(model)
    layers = [m for m in model.modules() if type(m).__name__ in targets]
    if not layers:
        yield
        return
    with progress.steps("layers", len(layers)) as advance:
        finished = 0

        def started(index: int) -> None:
            nonlocal finished
            if index > finished:
                advance(index - finished)
                finished = index

        handles = [layer.register_forward_pre_hook(lambda _m, _a, i=i: started(i)) for i, layer in enumerate(layers)]
        try:
            yield
            started(len(layers))
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def _fp32_layer_by_layer(model, *, active: bool):
    """Calibrate a model held in its stored dtype (bf16) with every computation in fp32, holding
    fp32 copies of one decoder layer at a time.

    llm-compressor's sequential pipeline offloads every module through compressed-tensors'
    ``OffloadCache`` and onloads one subgraph (a decoder layer) at a time to the execution
    device. Here each module's cache is ``_Fp32OnloadCache``: onloading a bf16 tensor gives an
    fp32 copy, so every forward, Hessian and observer runs in fp32 exactly as on a model loaded
    in fp32; a tensor the modifiers write (GPTQ's quantized weights, AWQ's and SmoothQuant's
    smoothed weights) is kept in fp32 while its layer is being worked on, and cast back to the
    stored dtype once the pipeline has moved to the next layer (nothing changes a finished layer
    within a pass: the modifiers' mappings stay inside one layer). That cast is the one the save
    does anyway, so a single calibration pass (GPTQ, static FP8/NVFP4 scales) writes the tensors a
    model held whole in fp32 writes, bit for bit; host memory holds the stored model plus about
    one layer in fp32. Smoothing (SmoothQuant, AWQ) is a pass of its own before the quantizing
    one, and its rewritten weights are kept in the stored dtype between the two passes, as on a
    GPU builder (keeping them in fp32 would hold the whole model in fp32 again): the quantized
    codes then differ from an fp32 model's by rounding (tested).
    """
    if not active:
        yield
        return
    import torch
    from compressed_tensors.offload import offload_module
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    promoted: dict[torch.Tensor, torch.dtype] = {}
    cache = _fp32_onload_cache()
    for module in model.modules():
        offload_module(module, "cpu", "cpu")
        module._parameters = cache.from_mapping(module._parameters.offloaded_values, "cpu", promoted=promoted)
        module._buffers = cache.from_mapping(module._buffers.offloaded_values, "cpu", promoted=promoted)
    targets = infer_sequential_targets(model)
    layers = [m for m in model.modules() if type(m).__name__ in targets]

    def finished(upto: int) -> None:
        for layer in layers[:upto]:
            for module in layer.modules():
                for tensors in (module._parameters, module._buffers):
                    # (modules the modifiers attach later, observers, are not offloaded)
                    for tensor in getattr(tensors, "offloaded_values", {}).values():
                        dtype = promoted.pop(tensor, None)
                        if dtype is not None:
                            tensor.data = tensor.data.to(dtype)

    handles = [layer.register_forward_pre_hook(lambda _m, _a, i=i: finished(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _fp32_onload_cache():
    import torch
    from compressed_tensors.offload.cache.cpu import CPUCache
    from compressed_tensors.offload.utils import send_tensors

    narrow = (torch.bfloat16, torch.float16)

    class _Fp32OnloadCache(CPUCache):
        """Host-memory offload cache whose onloaded copies of 16-bit tensors are fp32, and whose
        writes of fp32 data into a 16-bit tensor keep the fp32 values (recorded in ``promoted``
        to be cast back when their layer is finished)."""

        def __init__(self, onload_device, offload_device=None, *, promoted):
            super().__init__(onload_device, offload_device)
            self.promoted = promoted

        def onload(self, offloaded):
            if offloaded is not None and offloaded.dtype in narrow:
                return send_tensors(offloaded, device=self.onload_device, dtype=torch.float32)
            return super().onload(offloaded)

        @torch.no_grad()
        def update_offload(self, offloaded, data):
            if data is not None and offloaded.dtype in narrow and data.dtype == torch.float32:
                self.promoted.setdefault(offloaded, offloaded.dtype)
                offloaded.data = data.detach().to("cpu", copy=True)
                return
            super().update_offload(offloaded, data)

    return _Fp32OnloadCache


# Below this hidden size GPTQ's inner loop is many tiny ops and one CPU thread beats two (SmolLM2's
# 576); from it up the block updates are large enough matrix products that two threads win:
# a layer of the Llama-3.2-1B shape (2,048) took 1.47x less time on two threads, of the
# Llama-3.1-8B shape (4,096) 1.60x less (2 cores, W4A16 g128, 8 x 256 tokens).
GPTQ_ALL_THREADS_FROM_HIDDEN = 2048


@contextlib.contextmanager
def _threads_for(variant, device: str, config):
    """One CPU thread for GPTQ's compression of narrow models (see ``GPTQ_ALL_THREADS_FROM_HIDDEN``),
    and only for it: the calibration forwards and the propagation between layers keep every thread.
    On the demo's w4a16-gptq (SmolLM2, 32 x 256 tokens, 2 cores) quantizing took 100.7 s this way
    against 133.1 s with one thread for the whole oneshot, with the same quality figures to the last
    digit (mean KLD 0.228975, PPL 37.4473: the compression's arithmetic is the one-thread one), and
    105.5 s with two threads throughout (other roundings: KLD 0.226380)."""
    if variant.algorithm != "gptq" or device != "cpu" or \
            (getattr(config, "hidden_size", None) or 0) >= GPTQ_ALL_THREADS_FROM_HIDDEN:
        yield
        return
    import torch
    from llmcompressor.modifiers.quantization import GPTQModifier

    compress = GPTQModifier.compress_modules  # what the sequential pipeline calls after each layer

    def one_thread(self):
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return compress(self)
        finally:
            torch.set_num_threads(before)

    GPTQModifier.compress_modules = one_thread
    try:
        yield
    finally:
        GPTQModifier.compress_modules = compress


def _version(dist: str) -> str:
    from pipeline.toolchains import tool_version

    return tool_version(dist)


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
