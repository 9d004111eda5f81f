"""Benchmark: every GGUF type of a recipe, conversion + importance matrix + quantization, through
modelbuild vs llama.cpp's tools run by hand.

Side by side, each side in its own process, from the same bf16 checkpoint (the recipe's fetched
baseline) into scratch folders:
  - modelbuild: the recipe's gguf/convert-*, gguf/imatrix-* and quantize/<gguf variant> stages
    (planning included), built into a scratch cache;
  - by hand, per type: ``convert_hf_to_gguf.py`` to F16 (BF16 for the BF16 type), ``llama-imatrix``
    when the type uses one, ``llama-quantize`` -- the commands a user would script per file;
  - by hand, shared: the same tools with one F16 conversion and one importance matrix reused by
    every type (what a careful user does; the floor modelbuild is held to).
Prints wall times and ratios (target: modelbuild <= 1.0x the per-type script), then the quality
and speed table of the GGUF variants from the recipe's last run, if it is in the cache.

Usage: .venv/bin/python benchmarks/gguf_vs_by_hand.py [RECIPE] --cache-dir D
The recipe's fetch stage must be in the cache (run the recipe once).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import REPO, STAGE_SCRIPT_PROLOGUE, measure

MODELBUILD = STAGE_SCRIPT_PROLOGUE + """
store = CacheStore(Path(scratch))
done = {"fetch": StageInput(fetch.result, fetch)}
for stage in plan.stages:
    if stage.kind not in ("gguf_convert", "gguf_imatrix", "gguf_quantize"):
        continue
    inputs = {i: done[i] for i in stage.inputs}
    entry = store.put(stage.key, lambda o, s=stage, i=inputs: runner(s.kind).run(ctx, s, i, o), {})
    done[stage.id] = StageInput(entry.result, entry)
print(json.dumps({"stages": len(done) - 1}))
"""

BY_HAND = """
import json, os, subprocess, sys
from pathlib import Path
from transformers import AutoTokenizer
from pipeline.recipe import load_recipe
from pipeline.quality.calibration import calibration_samples
from pipeline.plan.variant_stages import Planning
from pipeline.toolchains import llamacpp
recipe_path, checkpoint, scratch, mode = sys.argv[1:5]
recipe = load_recipe(Path(recipe_path)).recipe
chain = llamacpp.find()
out = Path(scratch)
threads = str(os.cpu_count() or 1)
def sh(*cmd, env=None):
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, env=env)
def convert(outtype, target):
    sh(sys.executable, chain.converter, checkpoint, "--outfile", target, "--outtype", outtype, env=chain.converter_env())
def imatrix(model, variant, target):
    cal = Planning(recipe=recipe, data={}, eval_params={}).calibration(variant)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    text = out / "calibration.txt"
    samples = calibration_samples(recipe.calibration, samples=cal["samples"], seq_len=cal["seq_len"], seed=cal["seed"], tokenizer=tok)
    text.write_text("".join(tok.decode(s) for s in samples))
    sh(chain.tool("llama-imatrix"), "-m", model, "-f", text, "-o", target, "-c", cal["seq_len"], "--chunks",
       cal["samples"], "-t", threads, "-b", cal["seq_len"], "--no-ppl")
variants = [v for v in recipe.variants if v.backend == "llamacpp"]
shared = {}
for v in variants:
    outtype = "bf16" if v.type == "BF16" else "f16"
    base = out / f"{v.name}-{outtype}.gguf"
    if mode == "shared" and outtype in shared:
        base = shared[outtype]
    else:
        convert(outtype, base)
        shared[outtype] = base
    if v.type in ("F16", "BF16"):
        continue
    cmd = [chain.tool("llama-quantize")]
    if v.uses_imatrix():
        im = out / "imatrix.gguf" if mode == "shared" else out / f"{v.name}-imatrix.gguf"
        if not im.exists():
            imatrix(shared["f16"] if mode == "shared" else (base if outtype == "f16" else shared["f16"]), v, im)
        cmd += ["--imatrix", im]
    for pattern, t in sorted(v.tensor_types.items()):
        cmd += ["--tensor-type", f"{pattern}={t}"]
    if v.output_type:
        cmd += ["--output-tensor-type", v.output_type]
    if v.token_embedding_type:
        cmd += ["--token-embedding-type", v.token_embedding_type]
    sh(*cmd, base, out / f"{v.name}-{v.type}.gguf", v.type, threads)
print(json.dumps({"files": len(list(out.glob("*.gguf")))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe", nargs="?", type=Path, default=REPO / "recipes" / "smollm2-135m-instruct.yaml")
    ap.add_argument("--cache-dir", type=Path, required=True)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from pipeline.progress import Reporter
    from pipeline.run.orchestrate import prepare

    prepared = prepare(args.recipe, cache_dir=args.cache_dir, storage=None, reporter=Reporter())
    plan = prepared.plan
    fetch = prepared.store.get(plan.by_id()["fetch"].key)
    if fetch is None:
        sys.exit("run the recipe once first: its fetch stage must be in the cache")
    gguf = [s for s in plan.stages if s.kind == "gguf_quantize"]
    print(f"{len(gguf)} GGUF variants of {args.recipe.name}")
    rows = {}
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        for side, cmd in (
            ("modelbuild", [py, "-c", MODELBUILD, str(args.recipe), str(args.cache_dir), f"{tmp}/mb"]),
            ("by hand, per type", [py, "-c", BY_HAND, str(args.recipe), str(fetch.data), f"{tmp}/each", "each"]),
            ("by hand, shared F16 + imatrix", [py, "-c", BY_HAND, str(args.recipe), str(fetch.data), f"{tmp}/shared", "shared"]),
        ):
            Path(cmd[-2] if side != "modelbuild" else cmd[-1]).mkdir(parents=True, exist_ok=True)
            rows[side] = measure(cmd)
            print(f"  {side}: {rows[side]['wall_s']:.1f} s", flush=True)
    mb = rows["modelbuild"]["wall_s"]
    print("\n| side | wall | modelbuild / side |\n| --- | --- | --- |")
    for side, r in rows.items():
        print(f"| {side} | {r['wall_s']:.1f} s | {mb / r['wall_s']:.2f}x |")
    _table(prepared, plan)


def _table(prepared, plan) -> None:
    print("\n| variant | type | size MB | PPL | PPL ratio | mean KLD | p99 KLD | top-1 | pp t/s | tg t/s | tensor types |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    stages = plan.by_id()
    for stage in plan.stages:
        if stage.kind != "gguf_quantize":
            continue
        name = stage.id.split("/", 1)[1]
        q = prepared.store.get(stage.key)
        e = prepared.store.get(stages[f"evaluate/{name}"].key)
        s = prepared.store.get(stages[f"speed/{name}"].key)
        if q is None or e is None or s is None:
            print(f"| {name} | (not built) |")
            continue
        m = e.result["metrics"]
        pp = next((v for k, v in s.result.items() if k.startswith("pp")), None)
        tg = next((v for k, v in s.result.items() if k.startswith("tg")), None)
        types = ", ".join(f"{t} {n}" for t, n in q.result["tensor_types"].items())
        print(f"| {name} | {stage.params['options']['type']} | {q.result['size_bytes'] / 1e6:.1f} | {m['ppl']:.3f} | "
              f"{m['ppl_ratio']:.3f} | {m['mean_kld']:.4f} | {m['p99_kld']:.3f} | {m['top1']:.3f} | {pp} | {tg} | {types} |")
    fid = prepared.store.get(stages["gguf/fidelity"].key) if "gguf/fidelity" in stages else None
    if fid is not None:
        r = fid.result
        print(f"\nfidelity: tokenizer mismatches {r['tokenizer']['mismatches']} of {r['tokenizer']['texts']} texts "
              f"({r['tokenizer']['tokens']} tokens); F16 vs baseline mean KLD {r['f16_mean_kld']:.2e} (max {r['f16_max_kld']:.2e})")
        print(json.dumps({"cpu": next((prepared.store.get(stages[s.id].key).result.get('cpu_model')
                                        for s in plan.stages if s.kind == 'gguf_speed' and prepared.store.get(s.key)), None)}))


if __name__ == "__main__":
    main()
