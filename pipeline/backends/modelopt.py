"""TensorRT-LLM's formats through NVIDIA ModelOpt, exported as unified Hugging Face checkpoints.

Quantization is ModelOpt's own flow (what its ``hf_ptq`` example does): load the checkpoint, take
the preset config for the variant's ``qformat`` (``mtq.FP8_DEFAULT_CFG``, ``NVFP4_DEFAULT_CFG``,
``INT4_AWQ_CFG``, ``INT8_SMOOTHQUANT_CFG``, ...; the KV-cache preset appended when asked),
``mtq.quantize`` with a forward loop over the recipe's calibration samples, then
``export_hf_checkpoint`` with the source's dtype for what stays unquantized. The export writes
``hf_quant_config.json`` and a ``quantization_config`` in ``config.json`` (``quant_method:
modelopt``), which TensorRT-LLM's PyTorch backend and vLLM read. ModelOpt's TensorRT-LLM checkpoint
export is deprecated upstream and not used. Calibration runs in fp32 on CPUs (bf16 matmuls are ~5x
slower there); scales come from those fp32 ranges. A model whose fp32 copy does not fit the host
is held in its stored dtype and calibrated one decoder layer at a time (ModelOpt's layerwise
calibration), each layer computed in fp32 while it is worked on (``_fp32_layer_by_layer``): the
scales and exported tensors of the model loaded whole in fp32, bit for bit (tested on every
format), in about the stored model's memory.

Evaluation scores the exported files, not the in-memory simulation (the export unifies scales of
layers an engine fuses, e.g. q/k/v): ``pipeline.backends.modelopt_checkpoint``.

The module also holds the recipe's parameter model of these variants (``ModelOptVariant``, with its
``TRTEngineBuild`` engines) and the one format table (``QFORMATS``) that both its validation and
the quantizer read.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.backends.base import FormatInfo, Quantizer
from pipeline.backends.shapes import architecture as architecture_of
from pipeline.backends.shapes import config_dtype, fused_experts, linear_input_widths
from pipeline.errors import RecipeError, StageError
from pipeline.hardware import check_parallelism, compute_capability, known_gpu
from pipeline.recipe.variants import Strict, VariantBase

# Engines, in modelbuild's names: "trtllm" is TensorRT-LLM's default (PyTorch) backend, served by
# `trtllm-serve`; "trtllm-engine" its legacy TensorRT backend (an engine built per GPU
# architecture from the checkpoint); "vllm" vLLM's ModelOpt integration.
# GPU support per engine as compute capability ranges [low, high): TensorRT-LLM's support matrix
# (FP8 on Ada/Hopper/Blackwell, FP8 row-wise on Hopper only, NVFP4 on Blackwell, W4A16 AWQ on
# Ampere/Ada/Hopper, INT8 SmoothQuant from Ampere in TensorRT engines only) and vLLM's ModelOpt
# integration (FP8 from 8.9, NVFP4 from 10.0; it rejects W4A16_AWQ and W8A8_SQ_PER_CHANNEL).
_ANY = 99.0
_NVFP4_EVAL = ("weights: stored NVFP4 (E2M1, FP8 scales per 16, fp32 global scale) dequantized exactly; input "
               "activations: NVFP4 (FP8 scales per 16 computed per token group, exported global input scale) "
               "simulated in fp32")
_NVFP4_GPUS = {"trtllm": (10.0, _ANY), "vllm": (10.0, _ANY), "trtllm-engine": (10.0, _ANY)}
# The formats, named as ModelOpt's own ``hf_ptq`` example names them (``--qformat``: the recipe's
# ``qformat`` choices, in this order). preset: the ``mtq.*_CFG`` config each uses (checked against
# the installed ModelOpt at plan time); algo: the ``quant_algo`` its export records; compute: the
# precision of the engines' matmuls on the quantized layers (``FormatInfo.compute``).
QFORMATS: dict[str, dict[str, Any]] = {
    # FP8 weights and activations, per-tensor static scales
    "fp8": {"compute": "fp8", "preset": "FP8_DEFAULT_CFG", "algo": "FP8", "bits": 8,
            "gpus": {"trtllm": (8.9, _ANY), "vllm": (8.9, _ANY), "trtllm-engine": (8.9, _ANY)},
            "eval": "weights: stored FP8 (E4M3, per-tensor scales) dequantized exactly; input activations: FP8 "
                    "with the exported static per-tensor scales, simulated in fp32"},
    # FP8 weights per channel, activations per token
    "fp8_pc_pt": {"compute": "fp8", "preset": "FP8_PER_CHANNEL_PER_TOKEN_CFG", "algo": "FP8_PER_CHANNEL_PER_TOKEN", "bits": 8,
                  "gpus": {"trtllm": (9.0, 10.0), "vllm": (8.9, _ANY), "trtllm-engine": (9.0, 10.0)},
                  "eval": "weights: stored FP8 (E4M3, per-channel scales) dequantized exactly; input activations: "
                          "FP8 per-token dynamic quantization simulated in fp32"},
    # NVFP4 weights and activations (W4A4)
    "nvfp4": {"compute": "fp4", "preset": "NVFP4_DEFAULT_CFG", "algo": "NVFP4", "bits": 4, "gpus": _NVFP4_GPUS, "eval": _NVFP4_EVAL},
    # NVFP4 on the MLP only, attention left in 16-bit
    "nvfp4_mlp_only": {"compute": "fp4", "preset": "NVFP4_MLP_ONLY_CFG", "algo": "NVFP4", "bits": 4, "gpus": _NVFP4_GPUS,
                       "eval": _NVFP4_EVAL + "; attention projections unquantized (16-bit) as exported"},
    # NVFP4 on the MLP and attention's o_proj
    "nvfp4_omlp_only": {"compute": "fp4", "preset": "NVFP4_OMLP_ONLY_CFG", "algo": "NVFP4", "bits": 4, "gpus": _NVFP4_GPUS,
                        "eval": _NVFP4_EVAL + "; q/k/v projections unquantized (16-bit) as exported"},
    # INT4 weights per block (AWQ-lite), 16-bit activations
    "int4_awq": {"compute": "16-bit", "preset": "INT4_AWQ_CFG", "algo": "W4A16_AWQ", "bits": 4,
                 "gpus": {"trtllm": (8.0, 10.0), "trtllm-engine": (8.0, 10.0)},
                 "eval": "weights: stored INT4 (per-block fp32 scales, AWQ pre-quant scales as exported) "
                         "dequantized exactly; activations: not quantized (16-bit in the engine, fp32 here)"},
    # INT8 SmoothQuant: per-channel weights, per-tensor activations
    "int8_sq": {"compute": "int8", "preset": "INT8_SMOOTHQUANT_CFG", "algo": "W8A8_SQ_PER_CHANNEL", "bits": 8,
                "gpus": {"trtllm-engine": (8.0, _ANY)},
                "eval": "weights: stored INT8 (per-channel scales) dequantized exactly; input activations: "
                        "SmoothQuant pre-quant scales then INT8 with the exported static per-tensor scales, "
                        "simulated in fp32"},
}
# KV-cache quantization presets (hf_ptq's --kv_cache_qformat).
KV_QFORMATS: dict[str, str] = {"fp8": "FP8_KV_CFG"}
_KV_EVAL = "; KV cache: FP8 with the exported per-layer k/v scales, simulated on post-RoPE keys and values"

# How each engine serves a published folder ({path} is filled in at publish).
_SERVE = {
    "trtllm": "trtllm-serve {path} --backend pytorch",
    "vllm": "vllm serve {path}",
}


class TRTEngineBuild(Strict):
    """One TensorRT-LLM legacy engine: built only on a GPU of that architecture."""

    gpu: str = Field(description="GPU the engine is built on and for, e.g. H100 (engines do not move between architectures)")
    tp: int = Field(1, ge=1, le=64, description="tensor parallel size")
    pp: int = Field(1, ge=1, le=64, description="pipeline parallel size")
    max_batch_size: int = Field(8, ge=1, le=4096)
    max_input_len: int = Field(1024, ge=1, le=1_048_576)
    max_seq_len: int = Field(2048, ge=2, le=1_048_576)
    max_num_tokens: int = Field(8192, ge=1, le=1_048_576)

    @model_validator(mode="after")
    def _consistent(self) -> TRTEngineBuild:
        object.__setattr__(self, "gpu", known_gpu(self.gpu))
        if self.max_input_len > self.max_seq_len:
            raise ValueError("max_input_len cannot exceed max_seq_len")
        return self

    @property
    def profile(self) -> str:
        """``sm90-tp1-pp1-b8-s2048``: what makes one engine differ from another."""
        cc = compute_capability(self.gpu)
        if cc is None:  # _consistent takes known GPUs only
            raise RecipeError(f"unknown GPU {self.gpu!r} for a TensorRT-LLM engine", field="engines")
        sm = f"sm{int(round(cc * 10))}"
        return f"{sm}-tp{self.tp}-pp{self.pp}-b{self.max_batch_size}-s{self.max_seq_len}"


class ModelOptVariant(VariantBase):
    """A Hugging Face checkpoint quantized by NVIDIA ModelOpt and exported in its unified format
    (``hf_quant_config.json``), served by TensorRT-LLM (and vLLM for FP8/NVFP4)."""

    backend: Literal["modelopt"]
    qformat: Literal[tuple(QFORMATS)] = Field(  # type: ignore[valid-type]
        description="ModelOpt quantization format (hf_ptq's --qformat names)"
    )
    kv_cache_qformat: Literal["none", "fp8"] = Field("none", description="KV-cache quantization (calibrated)")
    awq_block_size: int | None = Field(
        None, ge=8, le=4096, description="int4_awq: weight block size (ModelOpt's default 128)"
    )
    awq_alpha_step: float | None = Field(
        None, gt=0.0, le=1.0, description="int4_awq: AWQ-lite search step (ModelOpt's default 0.1; larger is faster)"
    )
    engines: list[TRTEngineBuild] = Field(
        default_factory=list,
        description="TensorRT-LLM legacy (TensorRT backend) engines to build from this checkpoint; each "
        "needs a GPU builder of its architecture with tensorrt_llm installed",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelOptVariant:
        if self.qformat != "int4_awq" and (self.awq_block_size is not None or self.awq_alpha_step is not None):
            raise ValueError("awq_block_size and awq_alpha_step apply to qformat int4_awq")
        profiles = [e.profile for e in self.engines]
        dupes = sorted({p for p in profiles if profiles.count(p) > 1})
        if dupes:
            raise ValueError(f"engines repeat the same build: {', '.join(dupes)}")
        return self

    def needs_calibration(self) -> bool:
        # Static activation scales, global NVFP4 input scales, AWQ's and SmoothQuant's searches
        # and KV-cache scales all observe activations; only fp8_pc_pt is data-free.
        return self.qformat != "fp8_pc_pt" or self.kv_cache_qformat != "none"

    def backend_params(self) -> dict:
        # Engines are built from the checkpoint: they are not part of the quantized bytes.
        return self.model_dump(mode="json", exclude={"name", "gate", "calibration", "engines"})


class ModelOptBackend(Quantizer):
    name = "modelopt"
    variant = ModelOptVariant
    distributions = (
        ("modelopt", "nvidia-modelopt"),
        ("transformers", "transformers"),
        ("torch", "torch"),
    )
    extra = "modelopt"
    chain = "trtllm"  # the standard chain, then the variant's requested engines

    def memory(self, variant: Any) -> dict[str, str | None]:
        # Calibrated: the stored model, one layer in fp32 (``_fp32_layer_by_layer``); data-free:
        # the stored model. The export is scored a layer at a time (``scores``).
        return {"quantize": "layerwise" if variant.needs_calibration() else "whole-stored", "evaluate": "streamed"}

    def describe(self, variant: Any) -> FormatInfo:
        info = QFORMATS[variant.qformat]
        engines = tuple(info["gpus"])
        return FormatInfo(
            format="modelopt-hf",
            scheme=info["algo"] + ("+FP8_KV" if variant.kv_cache_qformat == "fp8" else ""),
            weight_bits=info["bits"],
            engines=engines,
            min_compute_capability=min(low for low, _high in info["gpus"].values()),
            serve={e: _SERVE[e] for e in engines if e in _SERVE},  # engines are built, then served
            cpu_evaluation=info["eval"] + (_KV_EVAL if variant.kv_cache_qformat == "fp8" else ""),
            gpus={e: [low, None if high == _ANY else high] for e, (low, high) in info["gpus"].items()},
            compute=info["compute"],
            kv_cache="fp8" if variant.kv_cache_qformat == "fp8" else "16-bit",
        )

    def runs_on(self, variant: Any, compute_capability: float, engine: str | None = None) -> bool:
        gpus = QFORMATS[variant.qformat]["gpus"]
        ranges = ([gpus[engine]] if engine in gpus else []) if engine is not None else list(gpus.values())
        return any(low <= compute_capability < high for low, high in ranges)

    def gpu_requirement(self, variant: Any) -> str:
        gpus = QFORMATS[variant.qformat]["gpus"]
        return "; ".join(f"{engine}: compute capability {low:g}+" if high == _ANY else
                         f"{engine}: compute capability {low:g} to below {high:g}" for engine, (low, high) in gpus.items())

    def check_variant(self, variant: Any, model_config: Any) -> None:
        """The installed ModelOpt has the presets; it can export the architecture; AWQ's block
        size divides every quantized layer's input width; the KV cache can be calibrated."""
        try:
            mtq = _import_modelopt()
            from modelopt.torch.export.model_utils import MODEL_NAME_TO_TYPE
        except ImportError:
            return  # check_environment reports the missing library
        preset = QFORMATS[variant.qformat]["preset"]
        if not hasattr(mtq, preset):
            have = [q for q, info in QFORMATS.items() if hasattr(mtq, info["preset"])]
            raise RecipeError(f"qformat {variant.qformat} ({preset}) is not in the installed ModelOpt "
                              f"{_version()}", field="qformat", fix=f"choose one of {', '.join(have)}")
        if variant.kv_cache_qformat != "none" and not hasattr(mtq, KV_QFORMATS[variant.kv_cache_qformat]):
            raise RecipeError(f"kv_cache_qformat {variant.kv_cache_qformat} is not in the installed ModelOpt "
                              f"{_version()}", field="kv_cache_qformat", fix="use kv_cache_qformat: none")
        for i, spec in enumerate(variant.engines):
            cc = compute_capability(spec.gpu)
            if cc is None:  # the schema takes known GPUs only
                raise RecipeError(f"unknown GPU {spec.gpu!r} for an engine", field=f"engines.{i}.gpu")
            if not self.runs_on(variant, cc, "trtllm-engine"):
                raise RecipeError(f"a TensorRT-LLM engine for {spec.gpu} cannot run {QFORMATS[variant.qformat]['algo']} "
                                  f"(needs {self.gpu_requirement(variant)})", field=f"engines.{i}.gpu",
                                  fix="build the engine for a GPU that runs this format")
        if model_config is None:
            return
        for i, spec in enumerate(variant.engines):
            reason = check_parallelism(spec.tp, spec.pp, model_config)
            if reason:
                raise RecipeError(f"engine for {spec.gpu}: {reason}", field=f"engines.{i}.tp",
                                  fix="choose a tp that divides the attention heads")
        architecture = architecture_of(model_config)
        # ModelOpt's export names the model families it knows by a substring of the class name
        # (its own get_model_type); anything else has no export (nor a TensorRT-LLM model).
        if not any(key.lower() in architecture.lower() for key in MODEL_NAME_TO_TYPE):
            raise RecipeError(
                f"ModelOpt {_version()} cannot export architecture {architecture} (not among the model "
                f"families its exporter knows)", field="qformat",
                fix="use another backend for this model (llmcompressor or llamacpp)",
            )
        experts = fused_experts(model_config)
        if experts:
            # ModelOpt exports the experts one by one (its per-expert Hugging Face layout); the
            # evaluation loads the export into transformers' fused experts, which have no such
            # tensors (measured: ModelOpt 0.47, transformers 5.14.1, Qwen3-MoE and Mixtral).
            raise RecipeError(
                f"ModelOpt {variant.qformat} of the mixture-of-experts architecture {architecture}: its per-expert "
                f"export cannot be loaded back into transformers {_tool('transformers')}'s {', '.join(experts)} "
                "for evaluation", field="qformat", fix="use backend llamacpp (GGUF) for this model",
            )
        if variant.qformat == "int4_awq":
            block = variant.awq_block_size or _preset_block_size(mtq, preset)
            widths = linear_input_widths(model_config, ("lm_head",))
            bad = [(n, w) for n, w in widths if w % block]
            if bad:
                fits = [g for g in (128, 64, 32) if all(w % g == 0 for _n, w in widths)]
                name, width = bad[0]
                raise RecipeError(
                    f"AWQ block size {block} does not divide {name}'s {width} input features "
                    f"({len(bad)} layer(s) affected); ModelOpt cannot export such blocks",
                    field="awq_block_size", fix=f"set awq_block_size: {fits[0]}" if fits else "choose another qformat",
                )

    def quantize(self, variant: Any, source: Path, out: Path, *, calibration: Any, device: str) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source_dtype = config_dtype(source)
        mtq = _import_modelopt()
        from modelopt.torch.export import export_hf_checkpoint

        with _quiet_library_logs():
            model = AutoModelForCausalLM.from_pretrained(source, dtype=source_dtype, **_placement(source, device))
        model.eval()
        inputs_on = model.get_input_embeddings().weight.device  # the first GPU of a split model
        config = quant_config(variant)
        # Data-free, only weight ranges are taken: exact in the stored dtype. Calibrated on a CPU:
        # the whole model in fp32 when it fits (the fastest: layerwise calibration runs each layer
        # about twice), else held in the stored dtype and calibrated a layer at a time in fp32,
        # where ModelOpt finds the decoder layers. Both export the same bytes (tested), so the
        # choice is the host memory's alone and stays out of the key.
        calibrated_here = calibration is not None and device == "cpu"
        layers = _decoder_layers(model) if calibrated_here and not _whole_fp32_fits(source) else None
        if layers is not None:
            config["algorithm"] = _layerwise(config.get("algorithm"))
        elif calibrated_here:
            model.float()

        def forward_loop(m):
            with torch.no_grad():
                for ids in calibration:
                    # No KV cache: layerwise calibration replays captured inputs, and a captured
                    # cache (reset, not emptied) would add zero keys to every replay.
                    m(torch.tensor([ids], device=inputs_on), use_cache=False)

        try:
            with _quiet_library_logs():
                with _fp32_layer_by_layer(model, layers):
                    mtq.quantize(model, config, forward_loop=forward_loop if calibration is not None else None)
                # The export converts quantized weights to ``dtype`` but writes every other
                # tensor (embeddings, norms, unquantized layers) as it finds it, and runs a
                # forward (AWQ's scale fusion) that needs one dtype throughout: the whole model
                # goes back to the source dtype first (the fp32 hooks removed), as a bf16 model
                # quantized on a GPU is (calibrated ranges are then bf16 values, as they are there).
                if calibrated_here:
                    model.to(source_dtype)
                export_hf_checkpoint(model, dtype=source_dtype, export_dir=str(out))
        except (ValueError, RuntimeError, AssertionError, NotImplementedError) as e:
            raise StageError(f"ModelOpt failed on {variant.qformat}: {type(e).__name__}: {e}") from e
        AutoTokenizer.from_pretrained(source).save_pretrained(out)
        hf_quant = out / "hf_quant_config.json"
        if not hf_quant.is_file():
            raise StageError("ModelOpt's export wrote no hf_quant_config.json")
        quantization = json.loads(hf_quant.read_text(encoding="utf-8"))["quantization"]
        expected = QFORMATS[variant.qformat]["algo"]
        if quantization.get("quant_algo") != expected:
            # A preset that quantized nothing exports no quant_algo: never publish that as quantized.
            raise StageError(f"ModelOpt exported quant_algo {quantization.get('quant_algo')!r}, expected {expected}",
                             fix="check that the model has layers the qformat quantizes")
        return {
            "quant_algo": quantization.get("quant_algo"),
            "kv_cache_quant_algo": quantization.get("kv_cache_quant_algo"),
            "exclude_modules": quantization.get("exclude_modules", []),
            "source_dtype": str(source_dtype).removeprefix("torch."),
            "calibration_samples": 0 if calibration is None else len(calibration),
            "devices": sorted({str(p.device) for p in model.parameters()}),
        }

    def load_for_eval(self, path: Path, device: str) -> Any:
        from pipeline.backends.modelopt_checkpoint import load_exported

        return load_exported(path, device)

    def scores(self, path: Path, windows, device: str, scratch: Path) -> Iterator:
        """Layer by layer from the exported files: each module dequantized as the pass reaches it
        (the values ``load_for_eval`` computes; ``modelopt_checkpoint.load_streamed``)."""
        from pipeline.backends.modelopt_checkpoint import load_streamed
        from pipeline.quality.streamed import streamed_logprobs

        model, weights = load_streamed(path, device, scratch)
        yield from streamed_logprobs(model, windows, device, weights, scratch=scratch)


def quant_config(variant) -> dict[str, Any]:
    """ModelOpt's preset for the variant, with its AWQ settings and the KV-cache preset appended
    (as hf_ptq does: later entries of ``quant_cfg`` override earlier ones)."""
    mtq = _import_modelopt()
    config = copy.deepcopy(getattr(mtq, QFORMATS[variant.qformat]["preset"]))
    if variant.qformat == "int4_awq":
        if variant.awq_alpha_step is not None:
            config["algorithm"] = {**config["algorithm"], "alpha_step": variant.awq_alpha_step}
        if variant.awq_block_size is not None:
            for entry in _entries(config, "*weight_quantizer"):
                sizes = {k: v for k, v in entry["cfg"]["block_sizes"].items() if k not in (-1, "-1")}
                entry["cfg"]["block_sizes"] = {-1: variant.awq_block_size, **sizes}
    if variant.kv_cache_qformat != "none":
        kv = getattr(mtq, KV_QFORMATS[variant.kv_cache_qformat])
        config["quant_cfg"] = list(config["quant_cfg"]) + copy.deepcopy(list(kv["quant_cfg"]))
    return config


# A GPU holds the model when its free memory is this many times the checkpoint: the rest is for
# ModelOpt's quantizer state and the calibration activations.
GPU_HEADROOM = 1.25


def _placement(source: Path, device: str, free: dict[int, int] | None = None) -> dict[str, Any]:
    """``from_pretrained``'s placement of the whole model. On a CPU: host memory. On a GPU
    builder: the requested GPU when it holds the model, else (``--device cuda`` only) every
    visible GPU, the layers spread by accelerate (``device_map="auto"``, as ModelOpt's own
    examples load models larger than one GPU: it calibrates and exports a dispatched model).

    Args:
        free: free bytes per GPU index (default: what CUDA reports now).

    Raises:
        StageError: the GPUs allowed cannot hold the model together.
    """
    if not device.startswith("cuda"):
        return {}
    import torch

    from pipeline import memory

    if free is None:
        free = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    facts = memory.tensors(source)
    needed = GPU_HEADROOM * (facts.stored_bytes if facts is not None else 0)
    first = int(device.partition(":")[2] or 0)
    if needed <= free[first]:
        return {"device_map": {"": first}}
    allowed = [first] if ":" in device else sorted(free)
    if needed > sum(free[i] for i in allowed):
        where = f"GPU {first}" if len(allowed) == 1 else f"{len(allowed)} GPUs"
        raise StageError(
            f"ModelOpt needs ≈ {needed / 1e9:.1f} GB of GPU memory for this model; {where} have "
            f"{sum(free[i] for i in allowed) / 1e9:.1f} GB free",
            fix="use --device cuda to spread it over every visible GPU, or a builder with more GPU memory"
            if len(allowed) == 1 and len(free) > 1 else "use a builder with more GPU memory")
    return {"device_map": "auto", "max_memory": {i: int(free[i] / GPU_HEADROOM) for i in allowed}}


def _whole_fp32_fits(source: Path) -> bool:
    """Whether this host holds the whole model in fp32 (``pipeline.memory``'s ``whole-fp32``)."""
    from pipeline import memory

    facts = memory.tensors(source)
    return facts is None or memory.need("whole-fp32", facts) <= memory.host_memory()[0]


def _decoder_layers(model) -> list | None:
    """The decoder layers ModelOpt's layerwise calibration walks, or None where it finds none."""
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    if not LayerActivationCollector.is_supported(model):
        return None
    return list(LayerActivationCollector.get_decoder_layers(model))


def _layerwise(algorithm) -> dict[str, Any]:
    """The preset's calibration algorithm (a name or a dict) run one decoder layer at a time."""
    spec = {"method": algorithm or "max"} if not isinstance(algorithm, dict) else dict(algorithm)
    return {**spec, "layerwise": {"enable": True}}


@contextlib.contextmanager
def _fp32_layer_by_layer(model, layers: list | None):
    """While ModelOpt calibrates ``layers`` one at a time (its layerwise mode: it records a layer's
    inputs, then runs the algorithm on that layer alone), the layer being calibrated is computed in
    fp32 and the finished ones go back to the stored dtype, with the quantizer buffers they carry
    (the cast the export makes anyway). The embeddings' output is fp32, so the rotary tables and
    masks derived from the hidden states are those of an fp32 model. The last layer is promoted
    already when its inputs are recorded: the algorithm starts on it right after, without a
    forward first (AWQ reads the weights when it sets up). Then the scales are those of the model
    loaded whole in fp32, and at most two layers are in fp32 at once."""
    if layers is None:
        yield
        return
    import torch

    stored = next(model.parameters()).dtype
    handles = [model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.float())]

    def promote(index: int):
        def hook(layer, _args):
            if getattr(getattr(layer, "_layerwise_calib", None), "mode", None) == "capture":
                if index == len(layers) - 1:
                    layer.float()
                return
            for done in layers[:index]:
                if next(done.parameters()).dtype != stored:
                    done.to(stored)
            if next(layer.parameters()).dtype != torch.float32:
                layer.float()
        return hook

    handles += [layer.register_forward_pre_hook(promote(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _entries(config, name: str) -> list[dict]:
    found = [e for e in config["quant_cfg"] if isinstance(e, dict) and e.get("quantizer_name") == name and "cfg" in e]
    if not found:
        raise StageError(f"ModelOpt's preset has no {name!r} entry to configure", fix="check the pinned ModelOpt version")
    return found


def _preset_block_size(mtq, preset: str) -> int:
    for entry in getattr(mtq, preset)["quant_cfg"]:
        if isinstance(entry, dict) and entry.get("quantizer_name") == "*weight_quantizer":
            sizes = entry.get("cfg", {}).get("block_sizes", {})
            return int(sizes.get(-1, sizes.get("-1", 128)))
    return 128


def _import_modelopt():
    """``modelopt.torch.quantization``. Its import pulls DeepSpeed, which logs a warning when it
    finds no accelerator; on such machines DeepSpeed is told the CPU is meant."""
    import importlib

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return importlib.import_module("modelopt.torch.quantization")


def _version() -> str:
    return _tool("nvidia-modelopt")


def _tool(dist: str) -> str:
    from pipeline.toolchains import tool_version

    return tool_version(dist)


@contextlib.contextmanager
def _quiet_library_logs():
    """ModelOpt prints per-step progress (and its deepspeed import an accelerator banner); keep
    the run's output readable unless MODELBUILD_DEBUG=1."""
    if os.environ.get("MODELBUILD_DEBUG") == "1":
        yield
        return
    import io
    import warnings

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # the export's "Writing model shards" bar
    hf_logging.set_verbosity_error()  # the export passes transformers a deprecated argument name
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
