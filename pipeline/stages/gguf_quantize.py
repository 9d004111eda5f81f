"""gguf_quantize: one GGUF type from the shared conversion with llama-quantize (F16/BF16 are the
conversion itself), split when above the variant's size limit, real tensor types read back."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.backends import get_backend
from pipeline.hashing import sha256_file
from pipeline.stages.context import StageInput
from pipeline.toolchains import gguf_reader, llamacpp_tools

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class _Always(TypedDict):
    conversion: StageInput  # the F16 (or BF16) GGUF


class Inputs(_Always, total=False):  # optional roles (see ``pipeline.stages.gate.Inputs``)
    imatrix: StageInput  # types that use an importance matrix


class Result(TypedDict):
    format: dict[str, Any]
    size_bytes: int
    files: list[str]
    file_type: Any
    tensor_types: Any
    metadata: dict[str, Any]
    imatrix_sha256: str | None
    conversion: str


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    variant = ctx.variant(stage.variant)
    conversion = inputs["conversion"]
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
        if "imatrix" in inputs:
            imatrix = inputs["imatrix"].data / "imatrix.gguf"
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
