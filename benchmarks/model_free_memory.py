"""Benchmark: data-free quantization shard by shard, under a memory limit smaller than the model.

1. Writes a synthetic checkpoint (``pipeline.sources.synthetic``: random bf16 weights, the real
   Llama-3.2-3B configuration: about 6.4 GB in 1 GiB safetensors shards).
2. In a memory cgroup limited to ``--limit-gb`` (default 3 GiB, under half the checkpoint), with
   the checkpoint evicted from the page cache before each (so reads come from disk), runs
   each side by side, each in its own process:
   - the I/O floor: read every input shard once, then write as many bytes as the quantized output
     has, with fsync;
   - modelbuild's quantize step for an ``FP8_DYNAMIC`` variant with ``entrypoint: model_free``
     (llm-compressor's ``model_free_ptq`` under modelbuild's backend);
   - the same variant with the default in-memory ``oneshot`` entrypoint, which must load the
     whole model and so cannot fit (expected: killed by the limit).
3. Prints wall times, peak anonymous memory (sampled), the cgroup's peak and the ratio of the model-free quantize to the I/O floor
   (target <= 1.5x).
4. On the CPU, also measures the arithmetic floor: the least per-channel FP8 arithmetic a
   quantizer must do (row absmax, scale, divide, clamp, cast; torch, every core) over the same
   weights, with reading excluded. When that alone exceeds 1.5x the I/O floor, the target cannot
   be met on this machine by any quantizer written with torch's CPU kernels.

Needs root for the cgroup (``_common.MemoryCgroup``: cgroup v1 or v2); without it the limit is not
enforced and the script says so. Usage:
    .venv/bin/python benchmarks/model_free_memory.py [--workdir DIR] [--limit-gb 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, MemoryCgroup, evict_from_page_cache, run_sampled


def make_checkpoint(folder: Path) -> int:
    """The synthetic Llama-3.2-3B checkpoint (``pipeline.sources.synthetic``) in 1 GiB shards;
    returns its weights' bytes."""
    sys.path.insert(0, str(REPO))
    from pipeline.sources import synthetic

    return synthetic.write("llama-3.2-3b", folder, max_shard_bytes=1 << 30)["bytes"]


FLOOR = """
import os, sys
src, dst, nbytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
buf = bytearray(16 << 20)
for name in sorted(os.listdir(src)):
    if name.endswith('.safetensors'):
        with open(os.path.join(src, name), 'rb', buffering=0) as f:
            while f.readinto(buf):
                pass
os.makedirs(dst, exist_ok=True)
with open(os.path.join(dst, 'out.bin'), 'wb') as f:
    left = nbytes
    while left > 0:
        n = min(left, len(buf)); f.write(buf[:n]); left -= n
    f.flush(); os.fsync(f.fileno())
"""

QUANTIZE = """
import sys
from pathlib import Path
from pipeline.backends.llmcompressor import LLMCompressorBackend, LLMCompressorVariant
v = LLMCompressorVariant(name='fp8', backend='llmcompressor', scheme='FP8_DYNAMIC', entrypoint=sys.argv[3])
LLMCompressorBackend().quantize(v, Path(sys.argv[1]), Path(sys.argv[2]), calibration=None, device=sys.argv[4])
import os; os.sync()
"""

ARITHMETIC = """
import json, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file
spent = 0.0
for shard in sorted(Path(sys.argv[1]).glob('*.safetensors')):
    weights = load_file(str(shard))
    for name, w in weights.items():
        if w.dim() != 2 or 'embed_tokens' in name or 'lm_head' in name:
            continue
        start = time.perf_counter()
        scale = w.abs().amax(dim=1, keepdim=True).float() / 448.0
        (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        spent += time.perf_counter() - start
    del weights
print(json.dumps({'arithmetic_s': spent}))
"""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--limit-gb", type=float, default=3.0)
    ap.add_argument("--skip-oneshot", action="store_true", help="do not demonstrate the in-memory path failing")
    ap.add_argument("--device", default="cpu", help="where model_free quantizes (cpu, cuda)")
    ap.add_argument("--make-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mb-modelfree-"))
    src = work / "llama-3b-synthetic"
    if not (src / "model.safetensors.index.json").exists():
        # In a child process: this process stays small, so nothing it holds is counted below.
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make-checkpoint", str(src)], check=True)
        print(f"synthetic checkpoint written in {time.perf_counter() - t:.0f} s")
    total = folder_bytes(src)
    limit = int(args.limit_gb * (1 << 30))
    cgroup = MemoryCgroup(limit)
    if not cgroup.enforced:
        print(f"warning: memory limit NOT enforced ({cgroup.reason})", file=sys.stderr)
    try:
        free_out = work / "out-model-free"
        shutil.rmtree(free_out, ignore_errors=True)
        evict_from_page_cache(src)
        quant = run_sampled([sys.executable, "-c", QUANTIZE, str(src), str(free_out), "model_free", args.device], cgroup)
        if quant["exit"] != 0:
            sys.exit(f"model-free quantize failed ({quant['exit']}):\n{quant['stderr']}")
        out_bytes = folder_bytes(free_out)
        floor_dir = work / "floor"
        evict_from_page_cache(src)
        floor = run_sampled([sys.executable, "-c", FLOOR, str(src), str(floor_dir), str(out_bytes)], cgroup)
        shutil.rmtree(floor_dir, ignore_errors=True)
        oneshot = None
        if not args.skip_oneshot:
            one_out = work / "out-oneshot"
            shutil.rmtree(one_out, ignore_errors=True)
            evict_from_page_cache(src)
            oneshot = run_sampled([sys.executable, "-c", QUANTIZE, str(src), str(one_out), "oneshot", args.device], cgroup)
            shutil.rmtree(one_out, ignore_errors=True)
    finally:
        cgroup.close()
    arithmetic = None
    if args.device == "cpu":  # outside the cgroup: it holds one whole shard at a time, untimed
        done = subprocess.run([sys.executable, "-c", ARITHMETIC, str(src)], capture_output=True, text=True, check=True)
        arithmetic = json.loads(done.stdout.strip().splitlines()[-1])["arithmetic_s"]

    print(f"checkpoint {total / 1e9:.2f} GB (bf16, {len(list(src.glob('*.safetensors')))} shards); "
          f"memory limit {args.limit_gb:g} GiB ({'enforced by a cgroup' if cgroup.enforced else 'NOT enforced'})")
    def row(label, r):
        cg = "-" if r["cgroup_mb"] is None else f"{r['cgroup_mb']:.0f}MB"
        return f"{label:52}{r['wall_s']:>8.1f}s{r['anon_mb']:>10.0f}MB{cg:>12}"

    print(f"{'':52}{'wall':>9}{'peak anon':>12}{'cgroup peak':>12}")
    print(row("I/O floor (read input + write output)", floor))
    print(row(f"modelbuild FP8_DYNAMIC, entrypoint model_free ({args.device})", quant))
    if oneshot is not None:
        fate = "finished" if oneshot["exit"] == 0 else f"failed (exit {oneshot['exit']})"
        print(row("modelbuild FP8_DYNAMIC, entrypoint oneshot", oneshot) + f"  {fate}")
        if oneshot["exit"] != 0:
            last = [line for line in oneshot["stderr"].splitlines() if line.strip()][-1:] or ["(killed by the limit)"]
            print(f"  oneshot: {last[0][:160]}")
    print(f"output {out_bytes / 1e9:.2f} GB; model-free / I/O floor: {quant['wall_s'] / floor['wall_s']:.2f}x (target <= 1.5)")
    if arithmetic is not None:
        print(f"arithmetic floor on this CPU (minimal per-channel FP8 in torch, no I/O): {arithmetic:.1f}s = "
              f"{arithmetic / floor['wall_s']:.2f}x the I/O floor; model-free / (I/O + arithmetic floors): "
              f"{quant['wall_s'] / (floor['wall_s'] + arithmetic):.2f}x")
    print(f"workdir: {work}")


if __name__ == "__main__":
    main()
