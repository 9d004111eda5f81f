"""Benchmark: the streamed baseline from a 1B to an 8B shape, inside a memory cgroup.

For each shape (default: Llama-3.2-1B and Llama-3.1-8B, synthetic checkpoints from
``pipeline.sources.synthetic`` written once into the work folder), in its own process inside a
memory cgroup of ``--limit-gb`` (default 8 GiB, page cache included; the checkpoint evicted from
the page cache before), runs what the baseline stage runs: the eval windows (``--tokens`` of the
repository's WikiText-2 test text in windows of 512), ``load_offloaded`` (transformers' disk
offload onto the checkpoint's own files), ``streamed_logprobs`` (one decoder layer at a time in
fp32 over every window) and ``write_reference`` (the full-vocabulary reference).

With ``--fp8``, also per shape: the data-free FP8_DYNAMIC variant shard by shard (``model_free``)
and its evaluation as the evaluate stage runs it, each in the same cgroup.

Prints per shape: wall time, the forward's seconds, peak anonymous memory (sampled), peak RSS, the
cgroup's peak, the memory model's figure (``pipeline.memory``: ``streamed``), and across shapes the
ratios: peak anonymous memory (target <= 1.3x from 1B to 8B) and seconds per scored token against
the parameter ratio (the arithmetic floor: 2 x parameters FLOPs per token).

Needs root for the cgroup (``_common.MemoryCgroup``). Usage:
    .venv/bin/python benchmarks/streamed_scaling.py [--shapes llama-3.2-1b,llama-3.1-8b]
        [--workdir DIR] [--tokens 1024] [--limit-gb 8]
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

BASELINE = """
import json, sys, tempfile, time, torch
from pathlib import Path
from transformers import AutoTokenizer
from pipeline.quality.corpus import token_windows
from pipeline.quality.reference import write_reference
from pipeline.quality.streamed import load_offloaded, streamed_logprobs
src, out, tokens = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(src)
text = (Path(sys.argv[4])).read_text(encoding='utf-8')
windows = token_windows(text, tokenizer, tokens=tokens, seq_len=512, where='eval.corpus')
out.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory(dir=out, prefix='scratch-') as folder:
    model, weights = load_offloaded(src, dtype=torch.float32, device='cpu', offload_folder=Path(folder))
    started = time.perf_counter()
    scored = streamed_logprobs(model.eval(), windows, 'cpu', weights, scratch=Path(folder))
    facts = write_reference(out, scored, windows, vocab=int(model.config.vocab_size), top_k=None, advance=lambda n: None)
    forward = time.perf_counter() - started
print(json.dumps({'ppl': facts['ppl'], 'tokens_scored': facts['tokens_scored'], 'forward_s': forward}))
"""

# --fp8: the data-free FP8 variant a shard at a time (llm-compressor's model_free_ptq), then its
# evaluation as the evaluate stage runs it (layer by layer from the files, against the reference).
FP8_QUANTIZE = """
import sys
from pathlib import Path
from pipeline.backends.llmcompressor import LLMCompressorBackend, LLMCompressorVariant
v = LLMCompressorVariant(name='fp8', backend='llmcompressor', scheme='FP8_DYNAMIC', entrypoint='model_free')
LLMCompressorBackend().quantize(v, Path(sys.argv[1]), Path(sys.argv[2]), calibration=None, device='cpu')
"""

FP8_EVALUATE = """
import json, sys, tempfile, time, torch
from pathlib import Path
from pipeline.backends.llmcompressor import LLMCompressorBackend
from pipeline.quality.metrics import summarise
from pipeline.quality.reference import Reference
checkpoint, reference = Path(sys.argv[1]), Path(sys.argv[2])
ref = Reference(reference)
lps, klds, tops = [], [], []
started = time.perf_counter()
with tempfile.TemporaryDirectory(dir=checkpoint.parent, prefix='scratch-') as scratch:
    for i, (logprobs, next_ids) in enumerate(LLMCompressorBackend().scores(checkpoint, ref.tokens, 'cpu', Path(scratch))):
        lp, kld, top = ref.compare(i, logprobs, next_ids)
        lps.append(lp); klds.append(kld); tops.append(top)
forward = time.perf_counter() - started
metrics = summarise(torch.cat(lps), torch.cat(klds), torch.cat(tops), float(sys.argv[3]))
print(json.dumps({'mean_kld': metrics['mean_kld'], 'forward_s': forward}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--limit-gb", type=float, default=8.0, help="memory cgroup limit, GiB")
    ap.add_argument("--fp8", action="store_true", help="also FP8_DYNAMIC (model_free) and its evaluation")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from pipeline import memory
    from pipeline.sources import synthetic

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mb-streamed-"))
    corpus = REPO / "evals" / "data" / "wikitext-2" / "test.txt"
    limit = int(args.limit_gb * 2**30)
    cgroup = MemoryCgroup(limit)
    if not cgroup.enforced:
        print(f"memory limit NOT enforced: {cgroup.reason}")
    rows = {}
    try:
        for shape in args.shapes.split(","):
            src = work / f"{shape}-synthetic"
            if not (src / "model.safetensors.index.json").exists():
                print(f"writing the synthetic {shape} checkpoint into {src} ...", flush=True)
                synthetic.write(shape, src)
            facts = memory.tensors(src)
            evict_from_page_cache(src)
            print(f"{shape}: {facts.values / 1e9:.2f} B parameters, {facts.stored_bytes / 1e9:.2f} GB; baseline ...",
                  flush=True)
            out = work / f"reference-{shape}"
            r = run_sampled([sys.executable, "-c", BASELINE, str(src), str(out), str(args.tokens), str(corpus)],
                            cgroup, env={**os.environ, "PYTHONPATH": str(REPO)})
            if r["exit"] != 0:
                print(f"  failed (exit {r['exit']}): {r['stderr'][-800:]}")
                continue
            result = json.loads(r["stdout"].strip().splitlines()[-1])
            rows[shape] = {**r, **result, "parameters": facts.values, "model_gb": memory.need("streamed", facts, 512) / 1e9}
            print(f"  {r['wall_s']:.0f} s (forward {result['forward_s']:.0f} s), peak anonymous {r['anon_mb'] / 1024:.2f} GiB, "
                  f"peak RSS {r['rss_mb'] / 1024:.2f} GiB, cgroup peak {(r['cgroup_mb'] or 0) / 1024:.2f} GiB", flush=True)
            if args.fp8:
                fp8 = work / f"fp8-{shape}"
                if fp8.exists():
                    subprocess.run(["rm", "-rf", str(fp8)], check=True)
                for step, code, argv in (("FP8_DYNAMIC model_free", FP8_QUANTIZE, [str(src), str(fp8)]),
                                         ("its evaluation", FP8_EVALUATE, [str(fp8), str(out), str(result["ppl"])])):
                    evict_from_page_cache(src if step.startswith("FP8") else fp8)
                    q = run_sampled([sys.executable, "-c", code, *argv], cgroup, env={**os.environ, "PYTHONPATH": str(REPO)})
                    extra = q["stdout"].strip().splitlines()[-1] if q["exit"] == 0 and q["stdout"].strip() else q["stderr"][-500:]
                    print(f"  {shape} {step}: exit {q['exit']}, {q['wall_s']:.0f} s, peak anonymous "
                          f"{q['anon_mb'] / 1024:.2f} GiB, peak RSS {q['rss_mb'] / 1024:.2f} GiB, cgroup peak "
                          f"{(q['cgroup_mb'] or 0) / 1024:.2f} GiB {extra}", flush=True)
    finally:
        cgroup.close()

    print(f"\n| shape | parameters | wall s | forward s | s / token | GFLOP/s | peak anon GiB | peak RSS GiB | cgroup peak GiB "
          f"(limit {args.limit_gb:g}) | memory model GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape, r in rows.items():
        per_token = r["forward_s"] / r["tokens_scored"]
        flops = 2 * r["parameters"] * r["tokens_scored"] / r["forward_s"] / 1e9
        print(f"| {shape} | {r['parameters'] / 1e9:.2f} B | {r['wall_s']:.0f} | {r['forward_s']:.0f} | {per_token:.3f} | "
              f"{flops:.0f} | {r['anon_mb'] / 1024:.2f} | {r['rss_mb'] / 1024:.2f} | {(r['cgroup_mb'] or 0) / 1024:.2f} | "
              f"{r['model_gb']:.2f} |")
    if len(rows) >= 2:
        first, last = list(rows.values())[0], list(rows.values())[-1]
        names = list(rows)
        print(f"\n{names[-1]} / {names[0]}: peak anonymous {last['anon_mb'] / first['anon_mb']:.2f}x (target <= 1.3), "
              f"seconds per token {(last['forward_s'] / last['tokens_scored']) / (first['forward_s'] / first['tokens_scored']):.2f}x "
              f"for {last['parameters'] / first['parameters']:.2f}x the parameters (the arithmetic floor's ratio)")


if __name__ == "__main__":
    main()
