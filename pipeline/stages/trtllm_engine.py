"""trtllm_engine: build a TensorRT-LLM engine for one GPU architecture from a gated ModelOpt
checkpoint (``pipeline/toolchains/trtllm_build.py`` in TensorRT-LLM's Python).

The executor runs this stage only where ``pipeline.hardware`` finds the GPU architecture and
TensorRT-LLM; elsewhere it is reported as not built, with ``builder_command``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict, cast

from pipeline.errors import StageError, StageSkipped
from pipeline.hardware import TRTLLM_PYTHON_ENV, trtllm_python
from pipeline.stages.context import StageInput

if TYPE_CHECKING:
    from pipeline.stages.base import Stage
    from pipeline.stages.context import RunContext


class Inputs(TypedDict):
    checkpoint: StageInput  # the variant's ModelOpt checkpoint
    gate: StageInput  # its verdict (an ``after`` input: not in the key)


class Result(TypedDict):
    """What the build script reports (``sm``, ``gpu``, versions, ...) and how it was built."""

    sm: str
    tp: int
    pp: int
    limits: dict[str, int]
    build_command: str

SCRIPT = Path(__file__).resolve().parent.parent / "toolchains" / "trtllm_build.py"


def build_args(engine: dict, checkpoint: str, output: str) -> list[str]:
    return [
        str(SCRIPT), "--checkpoint", checkpoint, "--output", output,
        "--tp", str(engine["tp"]), "--pp", str(engine["pp"]),
        "--max-batch-size", str(engine["max_batch_size"]), "--max-input-len", str(engine["max_input_len"]),
        "--max-seq-len", str(engine["max_seq_len"]), "--max-num-tokens", str(engine["max_num_tokens"]),
    ]


def builder_command(recipe_path: Path, stage: Stage) -> str:
    """What to run on a machine that has the GPU and TensorRT-LLM."""
    engine = stage.params["engine"]
    return (f"on a builder with an {engine['gpu']} ({stage.params['sm']}) and TensorRT-LLM: "
            f"`modelbuild run {recipe_path}` ({TRTLLM_PYTHON_ENV}=<python with tensorrt_llm> if it lives in "
            f"another environment; share MODELBUILD_CACHE to reuse this machine's checkpoint)")


def run(ctx: RunContext, stage: Stage, inputs: Inputs, out: Path) -> Result:
    if not inputs["gate"].result["passed"]:
        raise StageSkipped("not built: the checkpoint failed its gate")
    checkpoint = inputs["checkpoint"].data
    engine = stage.params["engine"]
    args = build_args(engine, str(checkpoint), str(out / "engine"))
    python = trtllm_python()
    ctx.reporter.warn(f"building TensorRT-LLM engine {stage.id} (minutes)")
    done = subprocess.run([python, *args], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise StageError(f"TensorRT-LLM engine build failed: {' | '.join(tail)}",
                         fix="rerun with MODELBUILD_DEBUG=1 or run the build command by hand")
    try:
        facts = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise StageError("the engine build printed no result line") from None
    if facts["sm"] != stage.params["sm"]:
        raise StageError(f"engine built on {facts['sm']} ({facts['gpu']}), but the stage is for {stage.params['sm']}")
    return cast("Result", {
        **facts,
        "tp": engine["tp"], "pp": engine["pp"],
        "limits": {k: engine[k] for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens")},
        "build_command": " ".join([python if python != sys.executable else "python", *args]),
    })
