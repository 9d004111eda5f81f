"""Benchmark: ModelOpt variants through modelbuild vs ModelOpt's ``hf_ptq`` flow by hand.

For every modelopt variant of a recipe (default: the demo), side by side, each in its own process,
from the same bf16 checkpoint (the recipe's fetched baseline):
  - modelbuild: the variant's quantize stage (calibration sampling, ModelOpt quantize + export,
    checks of the export, hashing into the cache), after planning the one-variant recipe;
  - by hand: what ModelOpt's ``examples/llm_ptq/hf_ptq.py`` does with its public API: load the
    model, tokenize the same calibration windows, ``mtq.quantize`` with the same preset config
    (built by the same helper, so both sides run the very same ModelOpt work),
    back to bf16, ``export_hf_checkpoint``, save the tokenizer. Calibrated in fp32 like modelbuild
    on CPUs (bf16 matmuls are ~5x slower here, which would flatter modelbuild).
Prints medians over ``--repeat`` pairs (the side that goes first alternates) of wall time and peak
RSS of both and their ratios (target <= 1.1x), and checks both exports hold the same tensors.

Usage: .venv/bin/python benchmarks/modelopt_vs_by_hand.py [RECIPE] [--cache-dir D] [--only a,b]
The recipe's fetch stage must be in the cache (run the recipe once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _common import REPO, STAGE_SCRIPT_PROLOGUE, measure, single_variant_recipe

MODELBUILD = STAGE_SCRIPT_PROLOGUE + """
variant = sys.argv[4]
stage = plan.by_id()[f"quantize/{variant}"]
inputs = {"fetch": StageInput(fetch.result, fetch)}
out = CacheStore(Path(scratch)).put(stage.key, lambda o: runner("quantize").run(ctx, stage, inputs, o), {})
print(json.dumps({"checkpoint": str(fetch.data), "export": str(out.data)}))
"""

BY_HAND = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import modelopt.torch.quantization as mtq
from modelopt.torch.export import export_hf_checkpoint
sys.path.insert(0, "benchmarks")
from _common import calibration_windows
from pipeline.backends.modelopt import quant_config
from pipeline.recipe import load_recipe
recipe, checkpoint, out, variant = sys.argv[1:5]
loaded = load_recipe(recipe).recipe
v = next(x for x in loaded.variants if x.name == variant)
tok = AutoTokenizer.from_pretrained(checkpoint)
model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
loop = None
if v.needs_calibration():
    rows = calibration_windows(loaded, v, tok)
    def loop(m):
        with torch.no_grad():
            for r in rows:
                m(torch.tensor([r]))
mtq.quantize(model, quant_config(v), forward_loop=loop)
model.to(torch.bfloat16)  # the checkpoint's dtype, as hf_ptq's model has on a GPU
export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
tok.save_pretrained(out)
"""


def _same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and torch.equal(x[k].reshape(-1).view(torch.uint8), y[k].reshape(-1).view(torch.uint8))
        for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", default=str(REPO / "recipes" / "smollm2-135m-instruct.yaml"))
    ap.add_argument("--cache-dir", default=os.environ.get("MODELBUILD_CACHE", str(Path.home() / ".cache" / "modelbuild")))
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--repeat", type=int, default=3, help="pairs per variant (medians are printed)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from pipeline.recipe import load_recipe

    variants = [v.name for v in load_recipe(args.recipe).recipe.variants if v.backend == "modelopt"]
    if args.only:
        variants = [v for v in variants if v in args.only.split(",")]
    print(f"{'variant':26}{'modelbuild':>12}{'by hand':>10}{'ratio':>8}{'RSS mb':>9}{'RSS hand':>10}{'ratio':>8}"
          f"{'same bytes':>12}")
    for name in variants:
        ours_runs, hand_runs, same = [], [], True
        for rep in range(args.repeat):
            with tempfile.TemporaryDirectory() as scratch:
                single = single_variant_recipe(Path(args.recipe), name, Path(scratch))
                hand_out = Path(scratch) / "hand"
                checkpoint = _fetched_checkpoint(single, args.cache_dir)
                ours_cmd = [sys.executable, "-c", MODELBUILD, str(single), args.cache_dir, scratch, name]
                hand_cmd = [sys.executable, "-c", BY_HAND, args.recipe, checkpoint, str(hand_out), name]
                # Alternate which side goes first: a shared machine's load drifts.
                first, second = (ours_cmd, hand_cmd) if rep % 2 == 0 else (hand_cmd, ours_cmd)
                a, b = measure(first), measure(second)
                ours, hand = (a, b) if rep % 2 == 0 else (b, a)
                facts = json.loads(ours["stdout"].strip().splitlines()[-1])
                same = same and _same_tensors(Path(facts["export"]), hand_out)
            ours_runs.append(ours)
            hand_runs.append(hand)
        ours = {k: statistics.median(r[k] for r in ours_runs) for k in ("wall_s", "rss_mb")}
        hand = {k: statistics.median(r[k] for r in hand_runs) for k in ("wall_s", "rss_mb")}
        print(f"{name:26}{ours['wall_s']:>11.1f}s{hand['wall_s']:>9.1f}s{ours['wall_s'] / hand['wall_s']:>7.2f}x"
              f"{ours['rss_mb']:>9.0f}{hand['rss_mb']:>10.0f}{ours['rss_mb'] / hand['rss_mb']:>7.2f}x{str(same):>12}",
              flush=True)


def _fetched_checkpoint(recipe: Path, cache_dir: str) -> str:
    """The bf16 checkpoint of the recipe's cached fetch stage (both sides start from it)."""
    from pipeline.cache.store import CacheStore
    from pipeline.progress import Reporter
    from pipeline.run.orchestrate import prepare

    prepared = prepare(recipe, cache_dir=Path(cache_dir), storage=None, reporter=Reporter())
    entry = CacheStore(Path(cache_dir)).get(prepared.plan.by_id()["fetch"].key)
    if entry is None:
        sys.exit("the recipe's fetch stage is not in the cache: run the recipe once first")
    return str(entry.data)


if __name__ == "__main__":
    main()
