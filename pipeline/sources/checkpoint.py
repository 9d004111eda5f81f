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
    config = _read_json(root / "config.json", where)
    if config.get("auto_map") and not trust_remote_code:
        raise SourceError(
            "the model needs its repository's own Python code (config.json has auto_map)",
            where=where,
            fix="set source.trust_remote_code: true only if you trust that code",
        )
    return wanted_files(root, allow_pickle)


def check_safetensors(path: Path, *, where: str) -> None:
    """Validate a safetensors file's header and length without loading it.

    The format is an 8-byte little-endian header length, a JSON header whose ``data_offsets``
    index into the byte buffer that follows; the file must end exactly at the last offset.

    Raises:
        SourceError: truncated or corrupt file.
    """
    fix = "re-download or re-export the file"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError(f"corrupt safetensors file {path.name}: {size} bytes", where=where, fix=fix)
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 1024 * 1024):
                raise SourceError(f"corrupt safetensors file {path.name}: bad header length", where=where, fix=fix)
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SourceError(f"corrupt safetensors file {path.name}: unreadable header", where=where, fix=fix) from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + n + end
    if size != expected:
        state = "truncated" if size < expected else "corrupt (trailing bytes)"
        raise SourceError(
            f"{state} safetensors file {path.name}: {size} bytes, header says {expected}", where=where, fix=fix
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


def _read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"unreadable {path.name}: {e}", where=where, fix="re-download it") from None
