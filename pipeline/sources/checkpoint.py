"""Checks and copies for Hugging Face-style checkpoint folders, shared by every source kind."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import struct
from pathlib import Path

from pipeline.errors import SourceError

# What a build needs from a model repository: weights, configs, tokenizer, chat template.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.bin.index.json")
META_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "LICENSE*",
)


def allow_patterns(allow_pickle: bool) -> list[str]:
    return list(WEIGHT_PATTERNS + META_PATTERNS + (PICKLE_PATTERNS if allow_pickle else ()))


def wanted_files(root: Path, allow_pickle: bool) -> list[Path]:
    """Files under ``root`` (top level only, like a Hub repo's model files) a build uses."""
    patterns = allow_patterns(allow_pickle)
    return sorted(
        p.relative_to(root)
        for p in root.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)
    )


def inspect_checkpoint(root: Path, *, allow_pickle: bool, trust_remote_code: bool, where: str) -> list[Path]:
    """Refuse what a build must not or cannot use; return the files to take.

    Raises:
        SourceError: missing folder, no config, no weights, pickle-only weights without opt-in,
            remote code without opt-in, truncated or corrupt safetensors.
    """
    if not root.exists():
        raise SourceError(f"source folder not found: {root}", where=where, fix="check the path")
    if not root.is_dir():
        raise SourceError(f"not a folder: {root}", where=where, fix="give a checkpoint folder")
    if not (root / "config.json").is_file():
        raise SourceError(
            f"no config.json in {root}: not a Hugging Face checkpoint", where=where,
            fix="point at the folder holding config.json and *.safetensors",
        )
    names = [p.name for p in root.iterdir() if p.is_file()]
    safetensors = sorted(n for n in names if n.endswith(".safetensors"))
    pickles = sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in PICKLE_PATTERNS[:3]))
    if not safetensors and not pickles:
        raise SourceError(
            f"no weights in {root} (no *.safetensors)", where=where,
            fix="download the model's weights into that folder",
        )
    if not safetensors and not allow_pickle:
        raise SourceError(
            f"only pickle weights ({', '.join(pickles[:3])}) in {root}; pickle can run code when loaded",
            where=where,
            fix="convert them to safetensors, or set source.allow_pickle: true if you trust the files",
        )
    for name in safetensors:
        check_safetensors(root / name, where=where)
    for name in sorted(n for n in names if n.endswith(".safetensors.index.json")):
        _check_index(root, name, set(names), where)
    config = _read_json(root / "config.json", where)
    if not isinstance(config, dict):
        raise SourceError(f"config.json in {root} is not a JSON object", where=where,
                          fix="restore the model's config.json (a mapping of settings)")
    _check_tokenizer(root, names, where)
    if config.get("auto_map") and not trust_remote_code:
        raise SourceError(
            "the model needs its repository's own Python code (config.json has auto_map)",
            where=where,
            fix="set source.trust_remote_code: true only if you trust that code",
        )
    return wanted_files(root, allow_pickle)


# Bits per element of every dtype a safetensors header may name (the format's Dtype enum).
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}


def check_safetensors(path: Path, *, where: str) -> None:
    """Validate a safetensors file's header and length without loading it.

    The format is an 8-byte little-endian header length, a JSON object mapping each tensor name
    to ``{dtype, shape, data_offsets: [begin, end]}`` (plus an optional ``__metadata__`` of
    strings), then the byte buffer. As the safetensors library itself requires when loading,
    every tensor's byte span must equal its dtype's size times its element count, the spans must
    tile the buffer with no gap or overlap, and the file must end exactly at the last one: a
    header that lies is refused here (at resolve and fetch), not at baseline after it was cached.

    Raises:
        SourceError: truncated or corrupt file.
    """
    fix = "re-download or re-export the file"

    def corrupt(why: str) -> SourceError:
        return SourceError(f"corrupt safetensors file {path.name}: {why}", where=where, fix=fix)

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 1024 * 1024):
                raise corrupt("bad header length")
            header = json.loads(f.read(n))
    except OSError as e:
        raise SourceError(f"cannot read {path.name}: {e.strerror or e}", where=where, fix="check the file") from None
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise corrupt("unreadable header") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise corrupt("__metadata__ is not a mapping of strings")
            continue
        spans.append((*_tensor_span(name, info, corrupt), name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise corrupt(f"tensor {name!r} starts at byte {begin} of the data, expected {end} "
                          f"({'overlap' if begin < end else 'gap'})")
        end = stop
    expected = 8 + n + end
    if size != expected:
        state = "truncated" if size < expected else "corrupt (trailing bytes)"
        raise SourceError(
            f"{state} safetensors file {path.name}: {size} bytes, header says {expected}", where=where, fix=fix
        )


def _tensor_span(name: str, info, corrupt) -> tuple[int, int]:
    """``(begin, end)`` of one header entry, after checking it describes its own size."""
    if not isinstance(info, dict):
        raise corrupt(f"tensor {name!r}: entry is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        raise corrupt(f"tensor {name!r}: unknown dtype {dtype!r}")

    def is_count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise corrupt(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise corrupt(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, stop = offsets
    elements = 1
    for d in shape:
        elements *= d
    bits = elements * _DTYPE_BITS[dtype]
    if bits % 8 or stop - begin != bits // 8:
        raise corrupt(f"tensor {name!r}: {dtype} {shape} needs {bits / 8:g} bytes, data_offsets span {stop - begin}")
    return begin, stop


def _check_index(root: Path, name: str, present: set[str], where: str) -> None:
    """A sharded checkpoint's index must map tensor names to shards that are in the folder."""
    index = _read_json(root / name, where)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(f"{name} has no weight_map of tensor names to shard files", where=where,
                          fix="re-download or re-export the checkpoint")
    absent = sorted(set(weight_map.values()) - present)
    if absent:
        raise SourceError(f"{name} names shard(s) not in the folder: {', '.join(absent[:3])}", where=where,
                          fix="download the missing shards")


def _check_tokenizer(root: Path, names: list[str], where: str) -> None:
    """A build tokenizes the eval text with the checkpoint's own tokenizer: say which file is
    missing here rather than let transformers guess at a library later ("need sentencepiece")."""
    present = set(names)
    if "tokenizer.json" in present or "vocab.txt" in present or any(n.endswith(".model") for n in present):
        return
    if "vocab.json" in present and "merges.txt" in present:
        return
    if "vocab.json" in present:
        raise SourceError(f"tokenizer incomplete in {root}: vocab.json without merges.txt", where=where,
                          fix="copy the model's merges.txt (or tokenizer.json) into the folder")
    raise SourceError(
        f"no tokenizer in {root}: none of tokenizer.json, tokenizer.model, vocab.json + merges.txt",
        where=where, fix="copy the model's tokenizer files (tokenizer.json, tokenizer_config.json) into the folder",
    )


def copy_files(src_root: Path, files: list[Path], dest: Path, *, link: bool) -> None:
    """Copy (or hard-link, for immutable sources like Hub blobs) ``files`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in files:
        src = (src_root / rel).resolve()
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(src, target)
                continue
            except OSError:
                pass  # other filesystem: copy instead
        shutil.copyfile(src, target)


def _read_json(path: Path, where: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise SourceError(f"unreadable {path.name}: {e}", where=where, fix="re-download it") from None
