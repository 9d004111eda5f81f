"""Benchmark: the demo recipe through modelbuild vs the same work by hand, side by side.

Runs, each in its own process on the same machine in one go:
  1. ``modelbuild run`` on the demo recipe reduced to its fp8-dynamic variant, on an empty cache
     and storage;
  2. the same command again (a no-op rerun);
  3. ``benchmarks/by_hand_fp8.py`` (GGUF import + llm-compressor oneshot FP8_DYNAMIC + a plain
     evaluation script over the same tokens).
Prints wall time and peak RSS of each, and the ratios the spine targets:
  first run <= 1.1x by hand; no-op rerun <= 5 s; evaluation <= 1.5x a plain forward pass.

Usage: .venv/bin/python benchmarks/spine_vs_by_hand.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
from pathlib import Path

from _common import REPO, measure, single_variant_recipe

DEMO = REPO / "recipes" / "smollm2-135m-instruct.yaml"


def _sha(path: Path) -> str:
    from pipeline.hashing import sha256_file

    return sha256_file(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mb-bench-"))
    cache, store, hand = work / "cache", work / "store", work / "by-hand"
    hand.mkdir(parents=True, exist_ok=True)
    recipe = single_variant_recipe(DEMO, "fp8-dynamic", work)
    mb = [sys.executable, "-m", "pipeline", "run", str(recipe), "--cache-dir", str(cache), "--storage", str(store)]

    first = measure(mb)
    noop = measure(mb)
    by_hand = measure([sys.executable, str(REPO / "benchmarks" / "by_hand_fp8.py"), str(hand)])
    hand_facts = json.loads(by_hand["stdout"].strip().splitlines()[-1])

    entries = [json.loads(Path(p).read_text()) for p in glob.glob(str(cache / "objects" / "*" / "*" / "entry.json"))]
    stage = {e["describe"]["stage"]: e for e in entries}
    ev = stage["evaluate/fp8-dynamic"]
    manifest = json.loads(next(store.rglob("manifest.json")).read_text())

    rows = [
        ("first run: modelbuild", f"{first['wall_s']:.1f} s", f"{first['rss_mb']:.0f} MB"),
        ("by hand (import + oneshot + eval)", f"{by_hand['wall_s']:.1f} s", f"{by_hand['rss_mb']:.0f} MB"),
        ("no-op rerun: modelbuild", f"{noop['wall_s']:.1f} s", f"{noop['rss_mb']:.0f} MB"),
    ]
    print(f"{'':38}{'wall':>10}{'peak RSS':>12}")
    for name, wall, rss in rows:
        print(f"{name:38}{wall:>10}{rss:>12}")
    print()
    first_ratio = first["wall_s"] / by_hand["wall_s"]
    rss_ratio = first["rss_mb"] / by_hand["rss_mb"]
    ev_s = ev["result"]["forward_seconds"]
    print(f"first run / by hand, wall:      {first_ratio:.2f}x  (target <= 1.10)")
    print(f"first run / by hand, peak RSS:  {rss_ratio:.2f}x")
    print(f"no-op rerun:                    {noop['wall_s']:.1f} s (target <= 5 s)")
    print(f"evaluation of the FP8 variant over {hand_facts['tokens']} tokens (forward + all metrics): {ev_s:.1f} s")
    print(f"  / plain forward of the same FP8 model (transformers + compressed-tensors): "
          f"{hand_facts['variant_forward_s']:.1f} s = {ev_s / hand_facts['variant_forward_s']:.2f}x (target <= 1.5)")
    print(f"  / plain forward of the dense fp32 model:                                  "
          f"{hand_facts['plain_forward_s']:.1f} s = {ev_s / hand_facts['plain_forward_s']:.2f}x")
    print()
    m = manifest["metrics"]
    print(f"quality, modelbuild ({manifest['evaluation']['kld'].split(':')[0].split(' (')[0]}): PPL {m['ppl']:.3f} "
          f"ratio {m['ppl_ratio']:.4f} mean KLD {m['mean_kld']:.4f} top-1 {m['top1']:.4f}")
    print(f"quality, by hand (full-vocabulary KLD): PPL {hand_facts['ppl']:.3f} ratio {hand_facts['ppl_ratio']:.4f} "
          f"mean KLD {hand_facts['mean_kld']:.4f} top-1 {hand_facts['top1']:.4f}")
    ours = next(store.rglob("model.safetensors"))
    same = _sha(ours) == _sha(hand / "fp8" / "model.safetensors")
    print(f"FP8 weights file identical to the by-hand one: {'yes' if same else 'no'}")
    print("stage seconds: " + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in sorted(stage.items())))
    print(f"by-hand seconds: import {hand_facts['import_s']:.1f}, quantize {hand_facts['quantize_s']:.1f}, "
          f"eval {hand_facts['eval_s']:.1f}")
    print(f"workdir: {work}")


if __name__ == "__main__":
    main()
