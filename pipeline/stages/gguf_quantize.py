"""gguf_quantize: one GGUF type from the shared conversion with llama-quantize (F16/BF16 are the
conversion itself), split when above the variant's size limit, real tensor types read back."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

from pipeline.backends import get_backend
from pipeline.hashing import sha256_file
from pipeline.toolchains import gguf_reader, llamacpp_tools


def run(ctx, stage, inputs, out: Path) -> dict:
    name = stage.id.split("/", 1)[1]
    variant = ctx.variant(name)
    conversion = inputs[stage.params["base"]]
    base = gguf_reader.gguf_file(conversion.data)
    target = out / gguf_reader.file_name(conversion.result["metadata"], variant.type)
    imatrix = None
    if variant.type in ("F16", "BF16"):
        # The conversion is the file: a hard link into this entry (cache entries are immutable;
        # publishing copies), a copy across filesystems.
        try:
            os.link(base, target)
        except OSError:
            shutil.copyfile(base, target)
    else:
        imatrix_ids = [i for i in stage.inputs if i.startswith("gguf/imatrix")]
        if imatrix_ids:
            imatrix = inputs[imatrix_ids[0]].data / "imatrix.gguf"
        tmp = out / f".{target.name}.tmp"
        llamacpp_tools.quantize(base, tmp, variant, imatrix_file=imatrix, threads=max(1, os.cpu_count() or 1))
        tmp.rename(target)
    quantized = gguf_reader.read_metadata(target)
    files = [target]
    if variant.split_max_size:
        files = llamacpp_tools.split(target, variant.split_max_size)
    info = asdict(get_backend("llamacpp").describe(variant))
    info["serve"] = {engine: cmd.replace("{file}", files[0].name) for engine, cmd in info["serve"].items()}
    return {
        "format": info,
        "size_bytes": sum(f.stat().st_size for f in files),
        "files": [f.name for f in files],
        "file_type": quantized.get("general.file_type"),
        "tensor_types": quantized["tensor_types"],
        "metadata": {k: v for k, v in quantized.items() if k.startswith("general.")},
        "imatrix_sha256": sha256_file(imatrix) if imatrix is not None else None,
        "conversion": conversion.result["file"],
    }
