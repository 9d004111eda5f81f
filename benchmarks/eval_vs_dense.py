"""Evaluation cost per scheme: the forward pass modelbuild evaluates with vs a dense forward.

For every quantized checkpoint in a stage cache (from a `modelbuild run`), side by side in this
process on the same token windows: a plain dense fp32 forward of the baseline (the yardstick,
target ratio <= 1.5x), modelbuild's evaluation model (weights dequantized once, activation
quantization simulated), and what a user gets from transformers + compressed-tensors by hand
(`run_compressed=False`: per-forward fake quantization of weights and activations). Forwards are
interleaved and repeated; medians reported.

Usage: python benchmarks/eval_vs_dense.py --cache-dir D [--windows 4 --seq-len 512 --repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _entries(cache: Path) -> tuple[Path, dict[str, Path]]:
    baseline, variants = None, {}
    for entry in sorted(cache.glob("objects/*/*/entry.json")):
        describe = json.loads(entry.read_text())["describe"]
        stage = describe["stage"]
        if stage == "fetch":
            baseline = entry.parent / "data"
        elif stage.startswith("quantize/") and describe["params"].get("backend") == "llmcompressor":
            variants[stage.removeprefix("quantize/")] = entry.parent / "data"
    if baseline is None or not variants:
        raise SystemExit(f"no fetched model or llm-compressor variant in {cache}: run `modelbuild run` first")
    return baseline, variants


def _time(model, windows, torch) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for w in windows:
            model(w)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", type=Path, required=True)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from pipeline.backends.llmcompressor import LLMCompressorBackend

    baseline, variants = _entries(args.cache_dir)
    dense = AutoModelForCausalLM.from_pretrained(baseline, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, dense.config.vocab_size, (1, args.seq_len), generator=g) for _ in range(args.windows)]
    print(f"{len(windows)} windows x {args.seq_len} tokens, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| variant | dense fp32 | modelbuild eval | ratio | by hand (run_compressed=False) | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, path in sorted(variants.items()):
        ours = LLMCompressorBackend().load_for_eval(path, "cpu")
        plain = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
        # compressed-tensors decompresses FP4 weights into bf16, which fp32 activations cannot
        # multiply: a user casts them up (exact) after the dtype error.
        for p in plain.parameters():
            if p.dtype == torch.bfloat16:
                p.data = p.data.float()
        for m in (dense, ours, plain):  # warm-up
            _time(m, windows[:1], torch)
        runs: dict[str, list[float]] = {"dense": [], "ours": [], "plain": []}
        for _ in range(args.repeats):
            for key, m in (("dense", dense), ("ours", ours), ("plain", plain)):
                runs[key].append(_time(m, windows, torch))
        d, o, p = (statistics.median(runs[k]) for k in ("dense", "ours", "plain"))
        print(f"| {name} | {d:.2f} s | {o:.2f} s | {o / d:.2f}x | {p:.2f} s | {p / d:.2f}x |", flush=True)
        del ours, plain


if __name__ == "__main__":
    main()
