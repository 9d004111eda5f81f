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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.backends.base import Backend, FormatInfo
from pipeline.errors import RecipeError, StageError
from pipeline.recipe.variants import GGUF_TYPES
from pipeline.toolchains import llamacpp as toolchain
from pipeline.toolchains.gguf_reader import gguf_file
from pipeline.toolchains.llamacpp_tools import supported_architectures

EVALUATION = ("llama.cpp's own forward pass on the CPU (llama-cpp-python over the pinned llama.cpp, all "
              "logits): weights and activations exactly as a llama.cpp replica computes them")


class LlamaCppBackend(Backend):
    name = "llamacpp"
    distributions = (("llama_cpp", "llama-cpp-python"),)
    extra = "gguf"
    chain = "gguf"

    @property
    def tools(self) -> tuple[str, ...]:
        # The toolchain version names the bindings' version, llama.cpp's commit and build flags.
        return ("llama.cpp",)

    def check_environment(self) -> None:
        toolchain.find()

    def describe(self, variant: Any) -> FormatInfo:
        return FormatInfo(
            format="gguf",
            scheme=variant.type,
            weight_bits=GGUF_TYPES[variant.type],
            engines=("llama.cpp",),
            min_compute_capability=None,
            serve={"llama.cpp": "llama-server -m {path}/{file}"},
            cpu_evaluation=EVALUATION,
        )

    def check_variant(self, variant: Any, model_config: Any) -> None:
        architectures = list(getattr(model_config, "architectures", None) or [])
        supported = supported_architectures()
        if architectures and not any(a in supported for a in architectures):
            chain = toolchain.find()
            raise RecipeError(
                f"architecture {', '.join(architectures)} is not supported by llama.cpp's converter "
                f"(llama.cpp {chain.commit[:7]}, llama-cpp-python {toolchain.BINDINGS_VERSION})",
                field="type", fix="drop the GGUF variants or use a model llama.cpp supports",
            )

    def quantize(self, variant, source, out, *, calibration, device):  # pragma: no cover - see gguf stages
        raise StageError("GGUF variants are built by the gguf_* stages, not the generic quantize stage")

    def load_for_eval(self, path: Path, device: str) -> Any:
        return LlamaEval(gguf_file(path))

    def forward(self, model: Any):
        return model


class LlamaEval:
    """Next-token logits of a GGUF model for one window of token ids, computed by llama.cpp.

    The context is created on the first call, sized to the window (the whole window is one
    batch, so every position's logits come from one decode, as in llama-perplexity).
    """

    def __init__(self, path: Path, threads: int | None = None):
        self.path = path
        self.threads = threads or max(1, os.cpu_count() or 1)
        self.llm = None

    def __call__(self, ids):
        import numpy as np
        import torch

        tokens = [int(t) for t in ids.reshape(-1).tolist()]
        if self.llm is None or self.llm.n_ctx() < len(tokens):
            llama_cpp = toolchain.import_bindings(toolchain.find())
            self.close()
            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=len(tokens), n_batch=len(tokens), n_ubatch=len(tokens),
                logits_all=True, n_threads=self.threads, n_threads_batch=self.threads, verbose=False,
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
