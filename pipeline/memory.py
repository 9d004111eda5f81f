"""Host memory: what each way of processing a model needs, and what this machine has.

A stage declares its memory model by name (``Hints.memory``, set by the planner from what the
backend declares); before the stage is built, the need is computed from the tensors of the
checkpoint it reads (safetensors headers only: no weight is read) and compared with the host's
memory (physical memory, or the memory cgroup's limit when lower). A stage that cannot fit is
not started: it is reported as needing a bigger machine, like a stage that needs a GPU, instead
of being killed halfway by the kernel.

The models (``R``: the runtime, Python with torch and transformers imported; ``N``: the model's
parameters; ``T``: its largest tensor; ``L``: its largest decoder layer; 4 bytes per fp32 value):

- ``streamed``: one layer at a time in fp32 (``pipeline.quality.streamed``):
  ``R + 1.1 x 4 x (max(T, L) + 3 x S x V)`` (the tenth covers a layer's stored form and the
  windows' activations; ``S x V``: one window's logits, ``S`` its tokens, ``V`` the vocabulary,
  three times: fp32 logits, their log-softmax, and the reference's fp16 copy or its fp32 reading
  when comparing, which a 128k vocabulary makes larger than a 1B model's layer).
- ``layered``: the whole model in its stored dtype, one layer at a time computed in fp32 with
  GPTQ's Hessians (calibrated llm-compressor runs: its sequential pipeline): ``R + 1.1 x (stored
  bytes + 4 x (2 L + H))``, ``H``: the sum of squared input widths of the largest layer's
  matrices (one Hessian each); the two layer copies are the fp32 view the pipeline keeps onloaded
  and the fp32 values the modifiers write.
- ``layerwise``: the whole model in its stored dtype, calibrated one decoder layer at a time in
  fp32 (ModelOpt's layerwise calibration, ``pipeline.backends.modelopt``): ``R + 1.1 x (stored
  bytes + 4 x 2 L)`` (the layer being calibrated and, for a moment, the one before it).
- ``whole-fp32``: the whole model in fp32 (evaluation of formats not read layer by layer):
  ``R + 1.1 x 4 x (N + 3 x S x V)`` (``S = 0`` for stages that score no window).
- ``whole-stored``: the whole model in its stored dtype (data-free llm-compressor ``oneshot``):
  ``R + 1.1 x stored bytes``.
- ``shard``: one safetensors file and its quantized output (llm-compressor's ``model_free``):
  ``R + 2 x largest file``.

Calibrated on a Llama-3.2-1B-shaped checkpoint (``tests/test_scale.py``): its baseline, FP8
evaluation and ``model_free`` quantization (600 MB files) complete inside a 2 GiB memory cgroup,
where the models say 1.97, 1.97 and 1.8 GB (windows of 128 tokens); its W4A16 GPTQ peaked at
4.19 GB of anonymous memory where ``layered`` says 4.26 (``benchmarks/calibrated_at_scale.py``).
In windows of 512 (``benchmarks/streamed_scaling.py``, two runs, peaks sampled every 0.1 s) the
1B shape's baseline peaked at 2.05–2.37 GB anonymous and its FP8 evaluation at 2.49 GB, the 8B
shape's at 2.42–2.56 and 1.83 GB, where ``streamed`` says 2.62 and 3.78.

Stages whose work is memory-mapped by llama.cpp (conversion, imatrix, GGUF evaluation) declare no
model: their resident pages are file pages the kernel can drop.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

# Measured: 0.40 GB anonymous memory once torch, transformers, accelerate and llm-compressor are
# imported; the rest is the run's own heap (tokenizer, reference, plan).
RUNTIME_BYTES = 600_000_000
MODELS = ("streamed", "layered", "layerwise", "whole-fp32", "whole-stored", "shard")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_ITEM_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "U32": 4, "U16": 2}


@dataclass(frozen=True)
class Tensors:
    """What the memory models read of a checkpoint.

    Attributes:
        values: stored values (parameters, or packed words for a quantized format).
        stored_bytes: bytes on disk of all tensors.
        largest_tensor: values of the largest tensor.
        largest_layer: values of the largest decoder layer (all tensors under ``layers.<i>.``).
        largest_file: bytes of the largest safetensors file.
        largest_hessians: the largest, over decoder layers, of the sum of squared input widths of
            the layer's matrices (values of the GPTQ Hessians of one layer).
        vocab: rows of the embedding or output layer (0 when neither is named as transformers does).
    """

    values: int
    stored_bytes: int
    largest_tensor: int
    largest_layer: int
    largest_file: int
    largest_hessians: int = 0
    vocab: int = 0


def tensors(folder: Path) -> Tensors | None:
    """Sizes from the safetensors headers in ``folder`` (None: no safetensors files)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    values = stored = largest = largest_file = 0
    layers: dict[int, int] = {}
    hessians: dict[int, int] = {}
    vocab = 0
    for file in files:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        largest_file = max(largest_file, file.stat().st_size)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            values += count
            stored += count * _ITEM_BYTES.get(info["dtype"], 4)
            largest = max(largest, count)
            if name.endswith(("embed_tokens.weight", "lm_head.weight")) and info["shape"]:
                vocab = max(vocab, info["shape"][0])
            match = _LAYER.search("." + name)
            if match:
                index = int(match.group(1))
                layers[index] = layers.get(index, 0) + count
                if name.endswith(".weight") and len(info["shape"]) == 2:
                    hessians[index] = hessians.get(index, 0) + info["shape"][1] ** 2
    return Tensors(values, stored, largest, max(layers.values(), default=0), largest_file,
                   max(hessians.values(), default=0), vocab)


def need(model: str, facts: Tensors, seq_len: int = 0) -> int:
    """Bytes of host memory the named model needs for a checkpoint with these tensors, scoring
    windows of ``seq_len`` tokens (0: no window is scored)."""
    logits = 3 * seq_len * facts.vocab
    if model == "streamed":
        return RUNTIME_BYTES + int(1.1 * 4 * (max(facts.largest_tensor, facts.largest_layer) + logits))
    if model == "layered":
        return RUNTIME_BYTES + int(1.1 * (facts.stored_bytes + 4 * (2 * facts.largest_layer + facts.largest_hessians)))
    if model == "layerwise":
        return RUNTIME_BYTES + int(1.1 * (facts.stored_bytes + 4 * 2 * facts.largest_layer))
    if model == "whole-fp32":
        return RUNTIME_BYTES + int(1.1 * 4 * (facts.values + logits))
    if model == "whole-stored":
        return RUNTIME_BYTES + int(1.1 * facts.stored_bytes)
    if model == "shard":
        return RUNTIME_BYTES + 2 * facts.largest_file
    raise ValueError(f"unknown memory model {model!r}; known: {', '.join(MODELS)}")


def host_memory() -> tuple[int, str]:
    """``(bytes, what they are)``: the memory cgroup's limit when it is below physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    if limit is not None and limit < physical:
        return limit, "its memory cgroup's limit"
    return physical, "physical memory"


def shortfall(model: str | None, folder: Path | None, what: str, seq_len: int = 0) -> str | None:
    """One phrase saying what a stage needs and the host lacks, or None when it fits (or has no
    model, or its checkpoint is not safetensors); ``seq_len``: its scoring windows' tokens."""
    if model is None or folder is None:
        return None
    facts = tensors(folder)
    if facts is None:
        return None
    needed = need(model, facts, seq_len)
    have, kind = host_memory()
    if needed <= have:
        return None
    return (f"≈ {needed / 1e9:.1f} GB of host memory for {what} ({_WORDS[model]}); this machine has "
            f"{have / 1e9:.1f} GB ({kind})")


def scored_window(stage) -> int:
    """Tokens of the windows a stage scores (baseline and evaluation stages carry the eval's
    ``seq_len``; 0 for the others)."""
    value = stage.params.get("seq_len")
    return value if isinstance(value, int) else 0


_WORDS = {
    "streamed": "one layer at a time in fp32",
    "layered": "the model in its stored dtype, one layer at a time in fp32",
    "layerwise": "the model in its stored dtype, calibrated one layer at a time in fp32",
    "whole-fp32": "the whole model in fp32",
    "whole-stored": "the whole model in its stored dtype",
    "shard": "one checkpoint file and its output",
}


def _cgroup_limit() -> int | None:
    """This process's memory cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            candidates = [Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max",
                          Path("/sys/fs/cgroup/unified") / path.lstrip("/") / "memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"]
        else:
            continue
        for file in candidates:
            try:
                text = file.read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 1 << 60:  # v1 says "unlimited" with a huge number
                return int(text)
    return None
