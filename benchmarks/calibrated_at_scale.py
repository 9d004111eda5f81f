"""Benchmark: GPTQ (or a ModelOpt format) on a model held in bf16 with one layer at a time in fp32, against the fp32 model.

1. Writes a synthetic checkpoint (``pipeline.sources.synthetic``: random bf16 weights, a real
   configuration; default Llama-3.2-1B, 2.47 GB) once into the work folder.
2. Runs, side by side, each in its own process (the checkpoint evicted from the page cache
   before each), W4A16 GPTQ (groups of 128, ``--samples`` x ``--seq-len`` seeded random
   calibration tokens, the same for both):
   - what a user would otherwise run on a CPU: the model loaded whole in fp32, llm-compressor's
     ``oneshot`` with the same modifiers, cast back to bf16, saved compressed;
   - modelbuild's quantize step (the model held in bf16, llm-compressor's sequential pipeline
     computing one layer at a time in fp32: ``pipeline.backends.llmcompressor``), inside a memory
     cgroup of ``--limit-gb`` (default: the checkpoint's bf16 bytes + 3 GiB, the target), page
     cache included.
3. Prints wall time, peak resident memory (from ``wait4``; it counts the checkpoint's mapped
   pages too), peak anonymous memory (sampled), the cgroup's peak, modelbuild's
   memory model for the stage (``pipeline.memory``: ``layered``), the ratios, and whether the
   two checkpoints hold identical tensors (they should: one calibration pass).

With ``--modelopt QFORMAT`` (e.g. ``fp8``) the variant is ModelOpt's instead: by hand is its flow
on the model loaded whole in fp32 (``mtq.quantize``, cast to bf16, ``export_hf_checkpoint``),
modelbuild's the model held in bf16 and calibrated one layer at a time in fp32
(``pipeline.backends.modelopt``; memory model ``layerwise``).

Needs root for the cgroup (``_common.MemoryCgroup``); without it the limit is not enforced and
the script says so. Usage:
    .venv/bin/python benchmarks/calibrated_at_scale.py [--shape llama-3.2-1b] [--workdir DIR]
        [--samples 8] [--seq-len 256] [--limit-gb G] [--skip-by-hand] [--modelopt QFORMAT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, MemoryCgroup, evict_from_page_cache, run_sampled

# Both sides: the same variant, the same calibration ids (seeded), written to argv[2].
COMMON = """
import json, sys, torch
from pathlib import Path
from pipeline.backends import llmcompressor as lc
from pipeline.backends import modelopt as mo
src, out, samples, seq_len, qformat = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if qformat == '-':
    variant = lc.LLMCompressorVariant(name='w4a16-gptq', backend='llmcompressor', scheme='W4A16', algorithm='gptq',
                                      group_size=128)
else:
    variant = mo.ModelOptVariant(name='modelopt', backend='modelopt', qformat=qformat)
vocab = json.loads((src / 'config.json').read_text())['vocab_size']
g = torch.Generator().manual_seed(0)
calibration = [torch.randint(0, vocab, (seq_len,), generator=g).tolist() for _ in range(samples)]
"""

MODELBUILD = COMMON + """
backend = lc.LLMCompressorBackend() if qformat == '-' else mo.ModelOptBackend()
backend.quantize(variant, src, out, calibration=calibration, device='cpu')
"""

BY_HAND_MODELOPT = COMMON + """
from modelopt.torch.export import export_hf_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer
mtq = mo._import_modelopt()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
with torch.no_grad():
    mtq.quantize(model, mo.quant_config(variant), forward_loop=lambda m: [m(torch.tensor([ids])) for ids in calibration])
    model.to(torch.bfloat16)
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(out))
AutoTokenizer.from_pretrained(src).save_pretrained(out)
"""

BY_HAND = COMMON + """
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
data = Dataset.from_dict({'input_ids': calibration, 'attention_mask': [[1] * seq_len for _ in calibration]})
with lc._threads_for(variant, 'cpu', model.config):  # the threads modelbuild uses for GPTQ on CPUs
    oneshot(model=model, recipe=lc._modifiers(variant), dataset=data, num_calibration_samples=samples,
            max_seq_length=seq_len, shuffle_calibration_samples=False)
with torch.no_grad():
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.dtype == torch.float32:
            tensor.data = tensor.data.to(torch.bfloat16)
model.save_pretrained(out, save_compressed=True)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
"""

COMPARE = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file
def tensors(folder):
    out = {}
    for f in sorted(Path(folder).glob('*.safetensors')):
        out.update(load_file(str(f)))
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
bits = lambda t: t.reshape(-1).view(torch.uint8)  # FP8 has no torch.equal
same = a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])) for k in a)
print(json.dumps({'tensors': len(a), 'identical': same}))
"""


def run(code: str, args: list[str], cgroup: MemoryCgroup | None) -> dict:
    """One Python child (``run_sampled``), sizes in GB."""
    r = run_sampled([sys.executable, "-c", code, *args], cgroup, env={**os.environ, "PYTHONPATH": str(REPO)})
    return {**r, "rss_gb": r["rss_mb"] * 2**20 / 1e9, "anon_gb": r["anon_mb"] * 2**20 / 1e9,
            "cgroup_gb": None if r["cgroup_mb"] is None else r["cgroup_mb"] * 2**20 / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--limit-gb", type=float, default=None, help="cgroup limit (default: bf16 bytes + 3 GiB)")
    ap.add_argument("--modelopt", default=None, metavar="QFORMAT", help="a ModelOpt variant instead of W4A16 GPTQ")
    ap.add_argument("--skip-by-hand", action="store_true", help="only modelbuild's path (a model whose fp32 copy does not fit)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from pipeline import memory
    from pipeline.sources import synthetic

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mb-calibrated-"))
    src = work / f"{args.shape}-synthetic"
    if not (src / "model.safetensors.index.json").exists():
        print(f"writing the synthetic {args.shape} checkpoint into {src} ...", flush=True)
        synthetic.write(args.shape, src, max_shard_bytes=1 << 30)
    facts = memory.tensors(src)
    limit = int(args.limit_gb * 1e9) if args.limit_gb else facts.stored_bytes + (3 << 30)
    from pipeline.backends.modelopt import ModelOptBackend, ModelOptVariant

    model_name = "layered" if args.modelopt is None else ModelOptBackend().memory(
        ModelOptVariant(name="m", backend="modelopt", qformat=args.modelopt))["quantize"]
    model_need = memory.need(model_name, facts)
    print(f"{args.shape}: {facts.values / 1e9:.2f} B parameters, {facts.stored_bytes / 1e9:.2f} GB bf16, "
          f"{4 * facts.values / 1e9:.2f} GB in fp32; calibration {args.samples} x {args.seq_len} tokens; "
          f"modelbuild's memory model ({model_name}): {model_need / 1e9:.2f} GB; cgroup limit {limit / 1e9:.2f} GB")

    results = {}
    cgroup = MemoryCgroup(limit)
    if not cgroup.enforced:
        print(f"memory limit NOT enforced: {cgroup.reason}")
    try:
        sides = [("modelbuild (bf16 held, one layer in fp32)", MODELBUILD, work / "out-modelbuild", cgroup)]
        if not args.skip_by_hand:
            sides.append(("by hand (whole model in fp32)", BY_HAND if args.modelopt is None else BY_HAND_MODELOPT,
                          work / "out-by-hand", None))
        for label, code, out, group in sides:
            evict_from_page_cache(src)
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            print(f"running {label} ...", flush=True)
            results[label] = r = run(code, [str(src), str(out), str(args.samples), str(args.seq_len),
                                            args.modelopt or "-"], group)
            if r["exit"] != 0:
                print(f"  failed (exit {r['exit']}): {r['stderr'][-800:]}")
            else:
                print(f"  {r['wall_s']:.0f} s, peak RSS {r['rss_gb']:.2f} GB, peak anonymous {r['anon_gb']:.2f} GB"
                      + (f", cgroup peak {r['cgroup_gb']:.2f} GB (limit {limit / 1e9:.2f})" if r["cgroup_gb"] else ""))
    finally:
        cgroup.close()

    print("\n| path | wall s | peak RSS GB | peak anonymous GB | cgroup peak GB | exit |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        cg = f"{r['cgroup_gb']:.2f}" if r["cgroup_gb"] else "-"
        print(f"| {label} | {r['wall_s']:.0f} | {r['rss_gb']:.2f} | {r['anon_gb']:.2f} | {cg} | {r['exit']} |")
    labels = list(results)
    if len(labels) == 2 and all(results[k]["exit"] == 0 for k in labels):
        mb, hand = results[labels[0]], results[labels[1]]
        print(f"\nmodelbuild / by hand: time {mb['wall_s'] / hand['wall_s']:.2f}x, peak RSS {mb['rss_gb'] / hand['rss_gb']:.2f}x, "
              f"peak anonymous {mb['anon_gb'] / hand['anon_gb']:.2f}x")
        same = run(COMPARE, [str(work / "out-by-hand"), str(work / "out-modelbuild")], None)
        print("tensors:", same["stdout"].strip() or same["stderr"])
    mb = results[labels[0]]
    if mb["exit"] == 0:
        print(f"modelbuild peak anonymous / memory model: {mb['anon_gb'] * 1e9 / model_need:.2f}; "
              f"/ (bf16 bytes + 3 GiB): {mb['anon_gb'] * 1e9 / (facts.stored_bytes + (3 << 30)):.2f}")
    print(json.dumps({k: {kk: v for kk, v in r.items() if kk not in ("stdout", "stderr")} for k, r in results.items()}))


if __name__ == "__main__":
    main()
