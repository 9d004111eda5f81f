"""gguf_convert: the fetched checkpoint → one GGUF file (F16 or BF16) with llama.cpp's converter.

Shared by every GGUF type of the model; the recipe's metadata overrides go in here, and the file
is named per the GGUF spec from the metadata the converter wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipeline.stages.context import StageInput
from pipeline.toolchains import gguf_reader, llamacpp_tools

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class Inputs(TypedDict):
    checkpoint: StageInput  # the fetched model


class Result(TypedDict):
    file: str
    size_bytes: int
    metadata: dict[str, Any]


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    outtype = stage.params["outtype"]
    tmp = out / f".convert-{outtype}.gguf"
    llamacpp_tools.convert(inputs["checkpoint"].data, tmp, outtype, stage.params["metadata"], stage.params["license"])
    meta = gguf_reader.read_metadata(tmp)
    final = out / gguf_reader.file_name(meta, outtype.upper())
    tmp.rename(final)
    return {"file": final.name, "size_bytes": final.stat().st_size, "metadata": _plain(meta)}


def _plain(meta: dict) -> dict:
    """Metadata without the (long) chat template, for results and manifests."""
    return {k: v for k, v in meta.items() if k != "tokenizer.chat_template"}
