"""Layer-major evaluation from the files vs the whole model in memory, on a model that fits.

For the fetched baseline and each llm-compressor variant in a stage cache (from a `modelbuild
run`), side by side in this process on the same token windows: what the evaluation did before
(the whole checkpoint loaded in fp32, one forward per window: ``load_for_eval`` for a variant) and
what it does now (``pipeline.quality.streamed``: one decoder layer materialised at a time, read
from the checkpoint's files; ``Backend.scores`` for a variant). Load time included, runs
interleaved and repeated, medians reported with the ratio (target <= 1.15x) and the largest
difference between the two paths' log-probabilities (0 means identical figures). Then each path's
peak resident memory (``VmHWM``), each in a child process of its own.

Usage: python benchmarks/streamed_vs_in_memory.py --cache-dir D [--windows 8 --seq-len 512 --repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import measure
from eval_vs_dense import _entries


def whole(path: Path, variant: bool, windows):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.backends.llmcompressor import LLMCompressorBackend
    from pipeline.quality.runner import torch_forward, window_logprobs

    model = (LLMCompressorBackend().load_for_eval(path, "cpu") if variant
             else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    return [lp for lp, _ in window_logprobs(torch_forward(model), windows, "cpu")]


def streamed(path: Path, variant: bool, windows):
    import torch

    from pipeline.backends.llmcompressor import LLMCompressorBackend
    from pipeline.quality.streamed import load_offloaded, streamed_logprobs

    with tempfile.TemporaryDirectory() as scratch:
        if variant:
            return [lp for lp, _ in LLMCompressorBackend().scores(path, windows, "cpu", Path(scratch))]
        model, weights = load_offloaded(path, dtype=torch.float32, device="cpu", offload_folder=Path(scratch))
        return [lp for lp, _ in streamed_logprobs(model.eval(), windows, "cpu", weights, scratch=Path(scratch))]


def _windows(vocab: int, n: int, seq_len: int):
    import torch

    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))


def child(args) -> None:
    """One path once, in a fresh process (for its peak memory)."""
    import json

    config = json.loads((args.child_path / "config.json").read_text())
    windows = _windows(config["vocab_size"], args.windows, args.seq_len)
    (streamed if args.child == "streamed" else whole)(args.child_path, args.variant, windows)
    # The process's own high-water mark: a child's ru_maxrss starts from its parent's (Linux keeps
    # the pre-exec peak), which would report this benchmark's size, not the path's.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(f"VmHWM {int(hwm.split()[1]) // 1024}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="*", help="variant names (default: all llm-compressor variants)")
    ap.add_argument("--child", choices=("whole", "streamed"), help=argparse.SUPPRESS)
    ap.add_argument("--child-path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--variant", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    if args.cache_dir is None:
        ap.error("--cache-dir is required")

    import json

    import torch

    baseline, variants = _entries(args.cache_dir)
    chosen = {"baseline": (baseline, False)}
    chosen.update({n: (p, True) for n, p in sorted(variants.items()) if not args.variants or n in args.variants})
    vocab = json.loads((baseline / "config.json").read_text())["vocab_size"]
    windows = _windows(vocab, args.windows, args.seq_len)
    print(f"{args.windows} windows x {args.seq_len} tokens, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} (load included)")
    print("| model | whole model in memory | layer by layer | ratio | max abs diff | peak RSS whole | peak RSS streamed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (path, variant) in chosen.items():
        runs: dict[str, list[float]] = {"whole": [], "streamed": []}
        results = {}
        for _ in range(args.repeats):
            for key, fn in (("whole", whole), ("streamed", streamed)):
                started = time.perf_counter()
                results[key] = fn(path, variant, windows)
                runs[key].append(time.perf_counter() - started)
        diff = max((a - b).abs().max().item() for a, b in zip(results["whole"], results["streamed"], strict=True))
        rss = {}
        for key in ("whole", "streamed"):
            cmd = [sys.executable, __file__, "--child", key, "--child-path", str(path), "--windows", str(args.windows),
                   "--seq-len", str(args.seq_len)] + (["--variant"] if variant else [])
            rss[key] = int(measure(cmd)["stdout"].split("VmHWM ")[-1].split()[0])
        w, s = statistics.median(runs["whole"]), statistics.median(runs["streamed"])
        print(f"| {name} | {w:.2f} s | {s:.2f} s | {s / w:.2f}x | {diff:.1e} | {rss['whole']:.0f} MB | "
              f"{rss['streamed']:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
