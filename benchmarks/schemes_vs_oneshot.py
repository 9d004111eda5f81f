"""Benchmark: each llm-compressor variant through modelbuild vs llm-compressor's ``oneshot`` by hand.

For every variant of a recipe (default: recipes/smollm2-135m-instruct-full.yaml), side by side,
each in its own process, from the same bf16 checkpoint (the recipe's fetched baseline):
  - modelbuild: the variant's quantize stage (calibration sampling, llm-compressor, dtype
    handling, compressed save, hashing into the cache);
  - by hand: the script an engineer would write with llm-compressor's public API: load the model,
    tokenize the same calibration windows, ``oneshot``, save compressed. Its modifiers come from
    the same helper modelbuild uses, so both sides run the very same llm-compressor recipe and
    the ratio measures everything modelbuild adds around it.
Prints wall time and peak RSS of both and their ratios (target <= 1.1x), then the quality table
of the variants as published by the recipe's last run, if any.

Usage: .venv/bin/python benchmarks/schemes_vs_oneshot.py [RECIPE] [--cache-dir D] [--only a,b]
The recipe's fetch stage must be in the cache (run the recipe once); the quantize stages are
rebuilt in a scratch cache so the measurement always does the work. modelbuild's side includes
planning the one-variant recipe (source hashing, plan-time checks), as ``modelbuild run`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _common import REPO, STAGE_SCRIPT_PROLOGUE, measure, single_variant_recipe

MODELBUILD = STAGE_SCRIPT_PROLOGUE + """
variant = sys.argv[4]
# the quantize stage is built in a scratch cache.
stage = plan.by_id()[f"quantize/{variant}"]
inputs = {"fetch": StageInput(fetch.result, fetch)}
out = CacheStore(Path(scratch)).put(stage.key, lambda o: runner("quantize").run(ctx, stage, inputs, o), {})
print(json.dumps({"checkpoint": str(fetch.data), "size": out.result["size_bytes"]}))
"""

BY_HAND = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
sys.path.insert(0, "benchmarks")
from _common import calibration_windows
from pipeline.backends.llmcompressor import _modifiers, _threads_for, _no_pinning_without_accelerator
from pipeline.recipe import load_recipe
recipe, checkpoint, out, variant = sys.argv[1:5]
loaded = load_recipe(recipe).recipe
v = next(x for x in loaded.variants if x.name == variant)
tok = AutoTokenizer.from_pretrained(checkpoint)
kwargs = {}
calibrated = v.needs_calibration()
model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32 if calibrated else "auto")
if calibrated:
    from datasets import Dataset
    rows = calibration_windows(loaded, v, tok)
    n, L = len(rows), len(rows[0])
    kwargs = dict(dataset=Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * L] * n}),
                  num_calibration_samples=n, max_seq_length=L, shuffle_calibration_samples=False)
with _threads_for(v, "cpu", model.config), _no_pinning_without_accelerator():
    oneshot(model=model, recipe=_modifiers(v), **kwargs)
model.to(torch.bfloat16)
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", default=str(REPO / "recipes" / "smollm2-135m-instruct-full.yaml"))
    ap.add_argument("--cache-dir", default=os.environ.get("MODELBUILD_CACHE", str(Path.home() / ".cache" / "modelbuild")))
    ap.add_argument("--only", default="", help="comma-separated variant names")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from pipeline.recipe import load_recipe

    variants = [v.name for v in load_recipe(args.recipe).recipe.variants]
    if args.only:
        variants = [v for v in variants if v in args.only.split(",")]
    print(f"{'variant':16}{'modelbuild':>12}{'by hand':>10}{'ratio':>8}{'RSS mb':>9}{'RSS hand':>10}{'ratio':>8}")
    for name in variants:
        with tempfile.TemporaryDirectory() as scratch:
            single = single_variant_recipe(Path(args.recipe), name, Path(scratch))
            ours = measure([sys.executable, "-c", MODELBUILD, str(single), args.cache_dir, scratch, name])
            checkpoint = json.loads(ours["stdout"].strip().splitlines()[-1])["checkpoint"]
            hand = measure([sys.executable, "-c", BY_HAND, args.recipe, checkpoint, str(Path(scratch) / "hand"), name])
        print(f"{name:16}{ours['wall_s']:>11.1f}s{hand['wall_s']:>9.1f}s{ours['wall_s'] / hand['wall_s']:>7.2f}x"
              f"{ours['rss_mb']:>9.0f}{hand['rss_mb']:>10.0f}{ours['rss_mb'] / hand['rss_mb']:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
