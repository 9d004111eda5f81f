"""Build one TensorRT-LLM engine (legacy TensorRT backend) from a ModelOpt-exported checkpoint.

Runs in the Python that has TensorRT-LLM, which usually is not modelbuild's (TensorRT-LLM pins
its own torch and transformers): standard library and TensorRT-LLM only, invoked as a script::

    python trtllm_build.py --checkpoint CKPT --output DIR --tp 1 --pp 1 \\
        --max-batch-size 8 --max-input-len 1024 --max-seq-len 2048 --max-num-tokens 8192

It uses TensorRT-LLM's LLM API for the TensorRT backend (``tensorrt_llm._tensorrt_engine.LLM``),
which reads ``hf_quant_config.json`` as a pre-quantized checkpoint, converts it and runs the
engine builder (what ``trtllm-build`` does on a converted checkpoint), then saves the engine
directory (``config.json``, ``rank<N>.engine``, tokenizer). The last line printed is a JSON object
with what the engine is tied to: GPU, architecture, TensorRT-LLM and TensorRT versions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", required=True)
    for flag in ("tp", "pp", "max-batch-size", "max-input-len", "max-seq-len", "max-num-tokens"):
        parser.add_argument(f"--{flag}", type=int, required=True)
    args = parser.parse_args(argv)

    import tensorrt
    import tensorrt_llm
    import torch
    from tensorrt_llm._tensorrt_engine import LLM
    from tensorrt_llm.llmapi import BuildConfig

    build_config = BuildConfig(max_batch_size=args.max_batch_size, max_input_len=args.max_input_len,
                               max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens)
    llm = LLM(model=args.checkpoint, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
              build_config=build_config)
    try:
        llm.save(args.output)
    finally:
        llm.shutdown()
    out = Path(args.output)
    engines = sorted(p.name for p in out.glob("rank*.engine"))
    if not (out / "config.json").is_file() or len(engines) != args.tp * args.pp:
        print(f"engine directory incomplete: {sorted(p.name for p in out.iterdir())}", file=sys.stderr)
        return 1
    major, minor = torch.cuda.get_device_capability(0)
    print(json.dumps({
        "gpu": torch.cuda.get_device_name(0),
        "sm": f"sm{major}{minor}",
        "tensorrt_llm": tensorrt_llm.__version__,
        "tensorrt": tensorrt.__version__,
        "engine_files": engines,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
