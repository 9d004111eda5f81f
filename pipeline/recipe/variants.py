"""Variant models: one class per backend, joined in a union discriminated by ``backend``.

A typo inside one backend's options produces one error with that backend's field path, not one
error per union member. Adding a backend adds one class here and one line in
``pipeline.backends.CATALOGUE``; no other backend is touched.

Stdlib and pydantic only: no backend library is imported here.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.recipe.gate import Gate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _compiles(regex: str, shown: str) -> None:
    try:
        re.compile(regex)
    except (re.error, RecursionError, OverflowError) as e:
        raise ValueError(f"invalid regular expression {shown!r}: {e}") from None


class CalibrationOverride(_Strict):
    """Per-variant changes to the recipe's calibration sampling."""

    samples: int | None = Field(None, ge=1, le=65536)
    seq_len: int | None = Field(None, ge=8, le=131072)
    seed: int | None = None


class _VariantBase(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    # Per-variant gate overrides the recipe's eval.gate field by field.
    gate: Gate | None = None
    calibration: CalibrationOverride | None = None

    def needs_calibration(self) -> bool:
        """Whether the quantize stage consumes calibration data (and so depends on its digest)."""
        return False

    def backend_params(self) -> dict:
        """The parameters that shape the quantized bytes (the stage key's parameters)."""
        return self.model_dump(mode="json", exclude={"name", "gate", "calibration"})


# llm-compressor / compressed-tensors preset names modelbuild builds, evaluates and records.
# (Whether the installed compressed-tensors has a preset is checked at plan time.)
LLMCOMPRESSOR_SCHEMES = (
    "FP8_DYNAMIC",  # FP8 weights per channel, FP8 activations per token (dynamic)
    "FP8",  # FP8 weights per tensor, FP8 activations per tensor (static, calibrated)
    "W8A8",  # INT8 weights per channel, INT8 activations per token (dynamic)
    "W8A16",  # INT8 weights per group, 16-bit activations
    "W4A16",  # INT4 weights per group (symmetric), 16-bit activations
    "W4A16_ASYM",  # INT4 weights per group with zero points
    "NVFP4A16",  # FP4 (E2M1) weights, FP8 scales per 16, fp32 global scale
    "NVFP4",  # NVFP4 weights and activations (calibrated global input scales)
    "MXFP4A16",  # FP4 weights, E8M0 scales per 32
    "MXFP4",  # MXFP4 weights and activations
)
# Schemes whose activation quantization needs observed ranges (static or global scales).
CALIBRATED_ACTIVATIONS = ("FP8", "NVFP4")
# Schemes whose weight group size a recipe may set (the FP4 formats fix theirs: 16 or 32).
GROUP_SIZE_SCHEMES = ("W8A16", "W4A16", "W4A16_ASYM")
INT_WEIGHT_ONLY = ("W8A16", "W4A16", "W4A16_ASYM")


class GPTQOptions(_Strict):
    """llm-compressor ``GPTQModifier`` settings."""

    dampening_frac: float = Field(0.01, gt=0.0, le=1.0)
    actorder: Literal["static", "group", "weight"] | None = Field(
        "static", description="activation ordering; null turns it off"
    )
    block_size: int = Field(128, ge=1, le=4096)


class AWQOptions(_Strict):
    """llm-compressor ``AWQModifier`` settings (a smaller ``n_grid`` searches fewer scales)."""

    n_grid: int = Field(20, ge=2, le=100)
    duo_scaling: bool | Literal["both"] = True

    @model_validator(mode="after")
    def _grid_fits(self) -> "AWQOptions":
        # llm-compressor divides by n_grid - 2 (duo_scaling true) or n_grid/2 - 1 ("both").
        least = {True: 3, "both": 4}.get(self.duo_scaling, 2)
        if self.n_grid < least:
            raise ValueError(f"n_grid must be at least {least} with duo_scaling {self.duo_scaling}")
        return self


class SmoothQuantOptions(_Strict):
    """llm-compressor ``SmoothQuantModifier`` settings (applied before quantization)."""

    smoothing_strength: float = Field(0.8, gt=0.0, lt=1.0)


class LLMCompressorVariant(_VariantBase):
    """A compressed-tensors checkpoint made by llm-compressor, served by vLLM."""

    backend: Literal["llmcompressor"]
    scheme: Literal[LLMCOMPRESSOR_SCHEMES] = Field(  # type: ignore[valid-type]
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
                _compiles(pattern[3:], pattern)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "LLMCompressorVariant":
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

    def needs_calibration(self) -> bool:
        return (
            self.algorithm in ("gptq", "awq")
            or self.smoothquant is not None
            or self.scheme in CALIBRATED_ACTIVATIONS
        )


# llama.cpp file types (llama-quantize's names) → nominal bits per weight on a Llama-sized model
# (from llama-quantize's own table; small models with tensors that are not multiples of 256 fall
# back to simpler types for many tensors, so the real mix is read back from each file).
GGUF_TYPES: dict[str, float] = {
    "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q5_1": 6.0,
    "Q5_0": 5.5, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_1": 5.0, "Q4_0": 4.5, "IQ4_XS": 4.25, "IQ4_NL": 4.5,
    "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "IQ3_M": 3.66, "IQ3_XXS": 3.06, "Q2_K": 3.0, "IQ2_M": 2.7,
    "IQ2_XS": 2.31, "IQ2_XXS": 2.06,
}
# Types llama-quantize refuses to make without an importance matrix.
GGUF_NEED_IMATRIX = ("IQ2_XS", "IQ2_XXS")
# ggml tensor types a recipe may pin single tensors to (llama-quantize --tensor-type and friends).
GGML_TENSOR_TYPES = (
    "f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "iq4_xs", "iq4_nl",
    "q3_k", "iq3_s", "iq3_xxs", "q2_k", "iq2_s", "iq2_xs", "iq2_xxs",
)
GGMLType = Literal[GGML_TENSOR_TYPES]  # type: ignore[valid-type]


class LlamaCppVariant(_VariantBase):
    """A GGUF file made by llama.cpp's converter and quantizer, served by llama.cpp."""

    backend: Literal["llamacpp"]
    type: Literal[tuple(GGUF_TYPES)] = Field(description="llama-quantize file type, e.g. Q4_K_M")  # type: ignore[valid-type]
    imatrix: bool | None = Field(
        None, description="use an importance matrix from the recipe's calibration text; default: on at <= 4 bits"
    )
    tensor_types: dict[str, GGMLType] = Field(
        default_factory=dict, description="tensor name pattern -> ggml type (llama-quantize --tensor-type)"
    )
    output_type: GGMLType | None = Field(None, description="type of output.weight")
    token_embedding_type: GGMLType | None = Field(None, description="type of token_embd.weight")
    split_max_size: str | None = Field(
        None, pattern=r"^[1-9][0-9]*[MG]$", description="split files above this size (e.g. 2G), llama.cpp split naming"
    )

    @field_validator("tensor_types")
    @classmethod
    def _tensor_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        # llama-quantize takes each as `PATTERN=TYPE` and compiles PATTERN as a regex.
        for pattern in value:
            if not pattern or "=" in pattern:
                raise ValueError(f"tensor name pattern {pattern!r} must be non-empty and contain no '='")
            _compiles(pattern, pattern)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "LlamaCppVariant":
        if self.type in ("F16", "BF16"):
            if self.imatrix:
                raise ValueError(f"imatrix does not apply to {self.type} (nothing is quantized)")
            if self.tensor_types or self.output_type or self.token_embedding_type:
                raise ValueError(f"tensor type overrides do not apply to {self.type}")
        if self.type in GGUF_NEED_IMATRIX and self.imatrix is False:
            raise ValueError(f"{self.type} needs an importance matrix (imatrix: true)")
        return self

    def uses_imatrix(self) -> bool:
        if self.imatrix is not None:
            return self.imatrix
        # On by default for the 4-bit and smaller types (Q4_*, IQ4_*, Q3_*, ...), as llama.cpp's
        # own guidance recommends; the digit after Q is the type's bit class.
        return self.type not in ("F16", "BF16") and int(self.type.lstrip("IQ")[0]) <= 4

    def needs_calibration(self) -> bool:
        return self.uses_imatrix()

    def backend_params(self) -> dict:
        # The resolved imatrix choice shapes the bytes, not whether it was spelled out.
        return {**super().backend_params(), "imatrix": self.uses_imatrix()}


# NVIDIA ModelOpt formats, named as ModelOpt's own ``hf_ptq`` example names them (``--qformat``).
# Each maps to one of ModelOpt's ``mtq.*_CFG`` presets (checked against the installed ModelOpt at
# plan time).
MODELOPT_QFORMATS: dict[str, str] = {
    "fp8": "FP8_DEFAULT_CFG",  # FP8 weights and activations, per-tensor static scales
    "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN_CFG",  # FP8 weights per channel, activations per token
    "nvfp4": "NVFP4_DEFAULT_CFG",  # NVFP4 weights and activations (W4A4)
    "nvfp4_mlp_only": "NVFP4_MLP_ONLY_CFG",  # NVFP4 on the MLP only, attention left in 16-bit
    "nvfp4_omlp_only": "NVFP4_OMLP_ONLY_CFG",  # NVFP4 on the MLP and attention's o_proj
    "int4_awq": "INT4_AWQ_CFG",  # INT4 weights per block (AWQ-lite), 16-bit activations
    "int8_sq": "INT8_SMOOTHQUANT_CFG",  # INT8 SmoothQuant: per-channel weights, per-tensor activations
}
# KV-cache quantization presets (hf_ptq's --kv_cache_qformat).
MODELOPT_KV_QFORMATS: dict[str, str] = {"fp8": "FP8_KV_CFG"}


class TRTEngineBuild(_Strict):
    """One TensorRT-LLM legacy engine: built only on a GPU of that architecture."""

    gpu: str = Field(description="GPU the engine is built on and for, e.g. H100 (engines do not move between architectures)")
    tp: int = Field(1, ge=1, le=64, description="tensor parallel size")
    pp: int = Field(1, ge=1, le=64, description="pipeline parallel size")
    max_batch_size: int = Field(8, ge=1, le=4096)
    max_input_len: int = Field(1024, ge=1, le=1_048_576)
    max_seq_len: int = Field(2048, ge=2, le=1_048_576)
    max_num_tokens: int = Field(8192, ge=1, le=1_048_576)

    @model_validator(mode="after")
    def _consistent(self) -> "TRTEngineBuild":
        from pipeline.hardware import (
            GPU_COMPUTE_CAPABILITY,
            compute_capability,
            normalise_gpu,
        )

        if compute_capability(self.gpu) is None:
            raise ValueError(f"unknown GPU {self.gpu!r}; known: {', '.join(GPU_COMPUTE_CAPABILITY)}")
        object.__setattr__(self, "gpu", normalise_gpu(self.gpu))
        if self.max_input_len > self.max_seq_len:
            raise ValueError("max_input_len cannot exceed max_seq_len")
        return self

    @property
    def profile(self) -> str:
        """``sm90-tp1-pp1-b8-s2048``: what makes one engine differ from another."""
        from pipeline.hardware import compute_capability

        sm = f"sm{int(round(compute_capability(self.gpu) * 10))}"
        return f"{sm}-tp{self.tp}-pp{self.pp}-b{self.max_batch_size}-s{self.max_seq_len}"


class ModelOptVariant(_VariantBase):
    """A Hugging Face checkpoint quantized by NVIDIA ModelOpt and exported in its unified format
    (``hf_quant_config.json``), served by TensorRT-LLM (and vLLM for FP8/NVFP4)."""

    backend: Literal["modelopt"]
    qformat: Literal[tuple(MODELOPT_QFORMATS)] = Field(  # type: ignore[valid-type]
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
    def _consistent(self) -> "ModelOptVariant":
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


Variant = Annotated[Union[LLMCompressorVariant, LlamaCppVariant, ModelOptVariant], Field(discriminator="backend")]
