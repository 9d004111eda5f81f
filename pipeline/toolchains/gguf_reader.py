"""GGUF files read with llama.cpp's own parser (``gguf.h`` in the pinned toolchain's
``libggml-base``, through ctypes): their spec names, scalar metadata and per-tensor types.

The header only is read, in milliseconds, where the Python ``gguf`` reader parses every vocabulary
entry (3.4 s on SmolLM2's 49,152 tokens, twice per quantized type).
"""

from __future__ import annotations

import ctypes
import functools
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import StageError
from pipeline.toolchains import llamacpp as toolchain


def gguf_file(folder: Path) -> Path:
    """The model file in a stage's output folder (the first shard when split)."""
    files = sorted(p for p in folder.glob("*.gguf") if not p.name.startswith("imatrix"))
    if not files:
        raise StageError(f"no .gguf file in {folder}")
    return files[0]


def file_name(meta: dict[str, Any], type_name: str) -> str:
    """The GGUF spec's file name: ``<BaseName>-<SizeLabel>-<FineTune>-<Version>-<Type>.gguf``.

    Absent parts are left out; spaces become dashes (the spec's naming convention).
    """
    parts = [meta.get("general.basename") or meta.get("general.name") or "model", meta.get("general.size_label"),
             meta.get("general.finetune"), meta.get("general.version"), type_name]
    return "-".join(str(p).strip().replace(" ", "-") for p in parts if p) + ".gguf"


def read_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's scalar metadata (``general.*``, ``tokenizer.ggml.*`` ids and names, the chat
    template, ``split.*``; arrays such as the vocabulary are left out) and its tensor type counts.

    Read with llama.cpp's own GGUF parser (``gguf.h`` in the toolchain's ``libggml-base``): the
    header only, in milliseconds, where the Python ``gguf`` reader parses every vocabulary entry
    (3.4 s on SmolLM2's 49,152 tokens, twice per quantized type).

    Raises:
        StageError: not a readable GGUF file.
    """
    lib = _gguf_library()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        raise StageError(f"llama.cpp cannot read {path.name} as GGUF")
    try:
        meta: dict[str, Any] = {}
        for i in range(lib.gguf_get_n_kv(ctx)):
            key = lib.gguf_get_key(ctx, i).decode()
            getter = _GGUF_SCALARS.get(lib.gguf_get_kv_type(ctx, i))
            if getter is not None:
                value = getattr(lib, getter)(ctx, i)
                meta[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        # Lower-case, as recipes spell ggml types (ggml's own names mix cases: q4_K).
        types = Counter(lib.ggml_type_name(lib.gguf_get_tensor_type(ctx, i)).decode().lower()
                        for i in range(lib.gguf_get_n_tensors(ctx)))
    finally:
        lib.gguf_free(ctx)
    meta["tensor_types"] = dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))
    meta["tensor_count"] = sum(types.values())
    return meta


def tensor_types(path: Path) -> dict[str, str]:
    """Each tensor's ggml type, by name."""
    lib = _gguf_library()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        raise StageError(f"llama.cpp cannot read {path.name} as GGUF")
    try:
        return {lib.gguf_get_tensor_name(ctx, i).decode(): lib.ggml_type_name(lib.gguf_get_tensor_type(ctx, i)).decode().lower()
                for i in range(lib.gguf_get_n_tensors(ctx))}
    finally:
        lib.gguf_free(ctx)


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


# enum gguf_type → the gguf.h getter of that scalar type (arrays, 9, are skipped).
_GGUF_SCALARS = {0: "gguf_get_val_u8", 1: "gguf_get_val_i8", 2: "gguf_get_val_u16", 3: "gguf_get_val_i16",
                 4: "gguf_get_val_u32", 5: "gguf_get_val_i32", 6: "gguf_get_val_f32", 7: "gguf_get_val_bool",
                 8: "gguf_get_val_str", 10: "gguf_get_val_u64", 11: "gguf_get_val_i64", 12: "gguf_get_val_f64"}
_GGUF_RETURNS = {"gguf_get_val_u8": ctypes.c_uint8, "gguf_get_val_i8": ctypes.c_int8,
                 "gguf_get_val_u16": ctypes.c_uint16, "gguf_get_val_i16": ctypes.c_int16,
                 "gguf_get_val_u32": ctypes.c_uint32, "gguf_get_val_i32": ctypes.c_int32,
                 "gguf_get_val_f32": ctypes.c_float, "gguf_get_val_bool": ctypes.c_bool,
                 "gguf_get_val_str": ctypes.c_char_p, "gguf_get_val_u64": ctypes.c_uint64,
                 "gguf_get_val_i64": ctypes.c_int64, "gguf_get_val_f64": ctypes.c_double}


@functools.cache
def _gguf_library():
    """ctypes bindings of the few ``gguf.h``/``ggml.h`` functions used above."""
    lib = ctypes.CDLL(str(toolchain.find().bin / "libggml-base.so"))
    c_ctx, c_i64 = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "gguf_init_from_file": (c_ctx, [ctypes.c_char_p, _GGUFInitParams]),
        "gguf_free": (None, [c_ctx]),
        "gguf_get_n_kv": (c_i64, [c_ctx]),
        "gguf_get_key": (ctypes.c_char_p, [c_ctx, c_i64]),
        "gguf_get_kv_type": (ctypes.c_int, [c_ctx, c_i64]),
        "gguf_get_n_tensors": (c_i64, [c_ctx]),
        "gguf_get_tensor_name": (ctypes.c_char_p, [c_ctx, c_i64]),
        "gguf_get_tensor_type": (ctypes.c_int, [c_ctx, c_i64]),
        "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]),
        **{name: (restype, [c_ctx, c_i64]) for name, restype in _GGUF_RETURNS.items()},
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib
