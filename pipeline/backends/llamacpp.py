"""GGUF files for llama.cpp, made and measured by llama.cpp itself.

Everything goes through the pinned toolchain (``pipeline.toolchains.llamacpp``):

- conversion: llama.cpp's ``convert_hf_to_gguf.py`` (run in place, in a subprocess), once per
  model into F16 (and BF16 when a variant asks for it), with the recipe's metadata overrides;
- importance matrix: ``llama-imatrix`` over the recipe's calibration text;
- quantization: ``llama-quantize`` (the built tool rather than the in-process binding
  ``llama_model_quantize``: both give the same tensors, but a crash in the tool cannot take the
  pipeline down, and the tool takes per-tensor type overrides as its own flags);
- splitting: ``llama-gguf-split`` (``-00001-of-0000N.gguf`` naming);
- evaluation: llama.cpp's own forward pass through llama-cpp-python (``logits_all``), so the
  numbers are what a llama.cpp replica computes;
- speed: ``llama-bench`` (prompt processing and generation tokens/s, median of repetitions).

The real per-tensor types of every file are read back with llama.cpp's GGUF parser: small models
whose rows are not multiples of 256 get simpler types than the file type's name says.

The module also holds the recipe's parameter model of GGUF variants (``LlamaCppVariant``) and the
file-type table (``GGUF_TYPES``) it validates against. Not a ``Quantizer``: the GGUF stages
(``pipeline.plan.gguf``) build these variants.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.backends.base import Backend, FormatInfo
from pipeline.errors import RecipeError, ToolError
from pipeline.recipe.variants import VariantBase, check_regex
from pipeline.toolchains import llamacpp as toolchain
from pipeline.toolchains.gguf_reader import gguf_file
from pipeline.toolchains.llamacpp_tools import supported_architectures, vocabulary_refusal

EVALUATION = ("llama.cpp's own forward pass on the CPU (llama-cpp-python over the pinned llama.cpp, all "
              "logits): weights and activations exactly as a llama.cpp replica computes them")


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


# The quantized KV-cache types llama-server takes for -ctk/-ctv (its --help), most faithful first.
KV_CACHE_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "iq4_nl", "q4_0")
# Every one of them stores blocks of 32 values, which must divide the head dimension.
KV_CACHE_BLOCK = 32


class LlamaCppVariant(VariantBase):
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
    kv_cache_types: list[Literal[KV_CACHE_TYPES]] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="quantized KV-cache types to measure (KLD cost in llama.cpp) and to serve with (a profile each)",
    )

    @field_validator("kv_cache_types")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each KV-cache type once")
        return value

    @field_validator("tensor_types")
    @classmethod
    def _tensor_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        # llama-quantize takes each as `PATTERN=TYPE` and compiles PATTERN as a regex.
        for pattern in value:
            if not pattern or "=" in pattern:
                raise ValueError(f"tensor name pattern {pattern!r} must be non-empty and contain no '='")
            check_regex(pattern, pattern)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LlamaCppVariant:
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
        # The resolved imatrix choice shapes the bytes, not whether it was spelled out; the KV
        # cache is a serving choice, measured by a stage of its own.
        params = {**super().backend_params(), "imatrix": self.uses_imatrix()}
        params.pop("kv_cache_types")
        return params


class LlamaCppBackend(Backend):
    """Not a ``Quantizer``: its variants are built by the GGUF stages (``pipeline.plan.gguf``)."""

    name = "llamacpp"
    variant = LlamaCppVariant
    distributions = (("llama_cpp", "llama-cpp-python"),)
    extra = "gguf"
    chain = "gguf"

    @property
    def tools(self) -> tuple[str, ...]:
        # The toolchain version names the bindings' version, llama.cpp's commit and build flags.
        return ("llama.cpp",)

    def check_environment(self) -> None:
        toolchain.find()

    def gpu_capable(self) -> bool:
        """Whether the GGUF stages that can use a GPU (importance matrix, evaluation) are planned
        for one on a GPU builder: when llama.cpp is built with CUDA (``toolchain install --cuda``)."""
        return toolchain.built_with_cuda()

    def describe(self, variant: Any) -> FormatInfo:
        return FormatInfo(
            format="gguf",
            scheme=variant.type,
            weight_bits=GGUF_TYPES[variant.type],
            engines=("llamacpp",),
            min_compute_capability=None,
            serve={"llamacpp": "llama-server -m {path}/{file}"},
            cpu_evaluation=EVALUATION,
        )

    def check_variant(self, variant: Any, model_config: Any) -> None:
        if variant.kv_cache_types:
            text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
            heads = getattr(text, "num_attention_heads", 0) or 0
            head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else 0)
            if head_dim % KV_CACHE_BLOCK:
                raise RecipeError(
                    f"llama.cpp stores a quantized KV cache in blocks of {KV_CACHE_BLOCK} values per head, and this "
                    f"model's head dimension is {head_dim}", field="kv_cache_types",
                    fix="leave kv_cache_types out for this model (its cache stays 16-bit)")
        architectures = list(getattr(model_config, "architectures", None) or [])
        supported = supported_architectures()
        if architectures and not any(a in supported for a in architectures):
            chain = toolchain.find()
            raise RecipeError(
                f"architecture {', '.join(architectures)} is not supported by llama.cpp's converter "
                f"(llama.cpp {chain.commit[:7]}, llama-cpp-python {toolchain.BINDINGS_VERSION})",
                field="type", fix="drop the GGUF variants or use a model llama.cpp supports",
            )
        folder = Path(getattr(model_config, "_name_or_path", "") or ".")
        if architectures and (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
            # A byte-level BPE vocabulary the converter may not know (SentencePiece ones it reads
            # from tokenizer.model as they are), in a checkpoint at hand (a local source or a
            # cached fetch): refused now rather than after the baseline and the other variants.
            refusal = vocabulary_refusal(folder)
            if refusal is not None:
                raise RecipeError(f"GGUF {variant.type} of {', '.join(architectures)}: {refusal}", field="type",
                                  fix="drop the GGUF variants or give the model a tokenizer llama.cpp's converter knows")

    def load_for_eval(self, path: Path, device: str) -> Any:
        return LlamaEval(gguf_file(path), gpu=device.startswith("cuda"))

    def scores(self, path: Path, windows, device: str, scratch: Path) -> Iterator:
        """llama.cpp itself, one window per decode (it maps the GGUF file: memory stays the
        file's pages plus one context)."""
        from pipeline.quality.runner import window_logprobs

        engine = self.load_for_eval(path, device)
        try:
            yield from window_logprobs(engine, windows, device)
        finally:
            engine.close()


class LlamaEval:
    """Next-token logits of a GGUF model for one window of token ids, computed by llama.cpp.

    The context is created on the first call, sized to the window (the whole window is one
    batch, so every position's logits come from one decode, as in llama-perplexity). With
    ``kv_cache`` (a type of ``KV_CACHE_TYPES``) keys and values are stored in that type, with
    flash attention on (llama.cpp needs it for a quantized V cache), as ``-ctk/-ctv`` serve.
    """

    def __init__(self, path: Path, threads: int | None = None, gpu: bool = False, kv_cache: str | None = None):
        self.path = path
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.gpu = gpu  # every layer on the GPU(s) (llama.cpp splits them over all visible ones)
        self.kv_cache = kv_cache
        self.llm = None

    def __call__(self, ids):
        import numpy as np
        import torch

        tokens = [int(t) for t in ids.reshape(-1).tolist()]
        if self.llm is None or self.llm.n_ctx() < len(tokens):
            chain = toolchain.find()
            if self.gpu and not chain.cuda:
                raise ToolError("GGUF evaluation was planned on the GPU but llama.cpp is built without CUDA",
                                fix="run `modelbuild toolchain install --cuda`, or run with --device cpu")
            llama_cpp = toolchain.import_bindings(chain)
            self.close()
            cache: dict = {}
            if self.kv_cache is not None:
                kind = getattr(llama_cpp, f"GGML_TYPE_{self.kv_cache.upper()}")
                cache = {"type_k": kind, "type_v": kind, "flash_attn": True}
            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=len(tokens), n_batch=len(tokens), n_ubatch=len(tokens),
                n_gpu_layers=-1 if self.gpu else 0,
                logits_all=True, n_threads=self.threads, n_threads_batch=self.threads, verbose=False, **cache,
            )
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32, copy=True))

    def close(self) -> None:
        """Free llama.cpp's model and context now (not at interpreter exit, where the bindings'
        finalisers fail noisily)."""
        if self.llm is not None:
            self.llm.close()
            self.llm = None
