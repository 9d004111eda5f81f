"""Benchmark: the streamed baseline from a 1B to an 8B shape, inside a memory cgroup.

For each shape (default: Llama-3.2-1B and Llama-3.1-8B, synthetic checkpoints from
``pipeline.sources.synthetic`` written once into the work folder), in its own process inside a
memory cgroup of ``--limit-gb`` (default 8 GiB, page cache included; the checkpoint evicted from
the page cache before), runs what the baseline stage runs: the eval windows (``--tokens`` of the
repository's WikiText-2 test text in windows of 512), ``load_offloaded`` (transformers' disk
offload onto the checkpoint's own files), ``streamed_logprobs`` (one decoder layer at a time in
fp32 over every window) and ``write_reference`` (the full-vocabulary reference).

With ``--data-free FP8_DYNAMIC,W8A16``, also per shape and scheme: the data-free variant shard by
shard (``model_free``) and its evaluation as the evaluate stage runs it. With ``--gguf
Q8_0,Q4_K_M``: what the GGUF stages run, with the pipeline's own functions: llama.cpp's converter
to F16 (``llamacpp_tools.convert``), an importance matrix over ``--samples`` x ``--seq-len``
calibration tokens of the repository's WikiText-2 valid text (drawn as the calibration stage draws
them) for the types that use one, ``llama-quantize``, and each file's evaluation in llama.cpp
against the baseline's reference. Each step in its own process, in a cgroup of its own.

Prints per shape: wall time, the forward's seconds, peak anonymous memory (sampled), peak RSS, the
cgroup's peak, the memory model's figure (``pipeline.memory``: ``streamed``), and across shapes the
ratios: peak anonymous memory (target <= 1.3x from 1B to 8B) and seconds per scored token against
the parameter ratio (the arithmetic floor: 2 x parameters FLOPs per token).

Needs root for the cgroup (``_common.MemoryCgroup``). Usage:
    .venv/bin/python benchmarks/streamed_scaling.py [--shapes llama-3.2-1b,llama-3.1-8b]
        [--workdir DIR] [--tokens 1024] [--limit-gb 8] [--data-free SCHEMES] [--gguf TYPES]
        [--samples 8] [--seq-len 256]
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

# --data-free: the variant a shard at a time (llm-compressor's model_free_ptq).
DATA_FREE = """
import sys
from pathlib import Path
from pipeline.backends.llmcompressor import LLMCompressorBackend, LLMCompressorVariant
v = LLMCompressorVariant(name='v', backend='llmcompressor', scheme=sys.argv[3], entrypoint='model_free')
LLMCompressorBackend().quantize(v, Path(sys.argv[1]), Path(sys.argv[2]), calibration=None, device='cpu')
"""

# A variant's evaluation as the evaluate stage runs it (the backend's scores: layer by layer from
# the files, or llama.cpp on the GGUF), against the baseline's reference.
EVALUATE = """
import json, sys, tempfile, time, torch
from pathlib import Path
from pipeline.backends import get_backend
from pipeline.quality.metrics import summarise
from pipeline.quality.reference import Reference
backend, checkpoint, reference = get_backend(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ref = Reference(reference)
lps, klds, tops = [], [], []
started = time.perf_counter()
with tempfile.TemporaryDirectory(dir=checkpoint.parent, prefix='scratch-') as scratch:
    for i, (logprobs, next_ids) in enumerate(backend.scores(checkpoint, ref.tokens, 'cpu', Path(scratch))):
        lp, kld, top = ref.compare(i, logprobs, next_ids)
        lps.append(lp); klds.append(kld); tops.append(top)
forward = time.perf_counter() - started
metrics = summarise(torch.cat(lps), torch.cat(klds), torch.cat(tops), float(sys.argv[4]))
print(json.dumps({'mean_kld': round(metrics['mean_kld'], 5), 'ppl': round(metrics['ppl'], 3), 'forward_s': round(forward, 1)}))
"""

# --gguf: the GGUF stages' work (pipeline.stages.gguf_convert, gguf_imatrix, gguf_quantize).
GGUF_CONVERT = """
import sys
from pathlib import Path
from pipeline.toolchains import llamacpp_tools
llamacpp_tools.convert(Path(sys.argv[1]), Path(sys.argv[2]), 'f16', {}, 'apache-2.0')
"""

GGUF_IMATRIX = """
import os, sys
from pathlib import Path
from types import SimpleNamespace
from transformers import AutoTokenizer
from pipeline.quality.calibration import calibration_samples
from pipeline.toolchains import llamacpp_tools
src, f16, out, corpus, samples, seq_len = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
tokenizer = AutoTokenizer.from_pretrained(src)
ids = calibration_samples(SimpleNamespace(path=corpus, dataset=None, chat_template=False), samples=samples,
                          seq_len=seq_len, seed=0, tokenizer=tokenizer)
text = out.parent / 'calibration.txt'
text.write_text(''.join(tokenizer.decode(w) for w in ids), encoding='utf-8')
llamacpp_tools.imatrix(f16, text, out, ctx=seq_len, chunks=samples, threads=os.cpu_count() or 1)
"""

GGUF_QUANTIZE = """
import os, sys
from pathlib import Path
from pipeline.backends.llamacpp import LlamaCppVariant
from pipeline.toolchains import llamacpp_tools
f16, out, kind, imatrix = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
v = LlamaCppVariant(name='v', backend='llamacpp', type=kind)
llamacpp_tools.quantize(f16, out, v, imatrix_file=Path(imatrix) if imatrix != '-' else None, threads=os.cpu_count() or 1)
"""


def _result(q: dict) -> str:
    """A step's JSON result line (its last stdout line that is one), or nothing."""
    return next((line for line in reversed(q["stdout"].splitlines()) if line.startswith("{")), "")


def fresh(path: Path) -> Path:
    """``path``, emptied of an earlier run's files."""
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--limit-gb", type=float, default=8.0, help="memory cgroup limit, GiB")
    ap.add_argument("--data-free", default="", help="schemes built by model_free and evaluated, e.g. FP8_DYNAMIC,W8A16")
    ap.add_argument("--gguf", default="", help="GGUF types built and evaluated, e.g. Q8_0,Q4_K_M")
    ap.add_argument("--samples", type=int, default=8, help="importance-matrix calibration samples")
    ap.add_argument("--seq-len", type=int, default=256, help="importance-matrix calibration sample length")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from pipeline import memory
    from pipeline.sources import synthetic

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mb-streamed-"))
    corpus = REPO / "evals" / "data" / "wikitext-2" / "test.txt"
    valid = corpus.with_name("valid.txt")
    from pipeline.backends.llamacpp import LlamaCppVariant

    steps: list[tuple[str, str, dict]] = []
    limit = int(args.limit_gb * 2**30)
    probe = MemoryCgroup(limit)
    if not probe.enforced:
        print(f"memory limit NOT enforced: {probe.reason}")
    probe.close()

    def measured(cmd: list[str]) -> dict:
        """``cmd`` in a cgroup of its own (a v2 cgroup's peak counts from its creation)."""
        group = MemoryCgroup(limit)
        try:
            return run_sampled(cmd, group, env={**os.environ, "PYTHONPATH": str(REPO)})
        finally:
            group.close()
    rows = {}
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
        r = measured([sys.executable, "-c", BASELINE, str(src), str(out), str(args.tokens), str(corpus)])
        if r["exit"] != 0:
            print(f"  failed (exit {r['exit']}): {r['stderr'][-800:]}")
            continue
        result = json.loads(r["stdout"].strip().splitlines()[-1])
        rows[shape] = {**r, **result, "parameters": facts.values, "model_gb": memory.need("streamed", facts, 512) / 1e9}
        print(f"  {r['wall_s']:.0f} s (forward {result['forward_s']:.0f} s), peak anonymous {r['anon_mb'] / 1024:.2f} GiB, "
              f"peak RSS {r['rss_mb'] / 1024:.2f} GiB, cgroup peak {(r['cgroup_mb'] or 0) / 1024:.2f} GiB", flush=True)
        def step(label: str, code: str, argv: list[str], evict: Path) -> dict | None:
            evict_from_page_cache(evict)
            q = measured([sys.executable, "-c", code, *argv])
            extra = _result(q) if q["exit"] == 0 else q["stderr"][-500:]
            print(f"  {shape} {label}: exit {q['exit']}, {q['wall_s']:.0f} s, peak anonymous "
                  f"{q['anon_mb'] / 1024:.2f} GiB, peak RSS {q['rss_mb'] / 1024:.2f} GiB, cgroup peak "
                  f"{(q['cgroup_mb'] or 0) / 1024:.2f} GiB {extra}", flush=True)
            steps.append((shape, label, q))
            return q if q["exit"] == 0 else None

        ppl = str(result["ppl"])
        for scheme in filter(None, args.data_free.split(",")):
            built = fresh(work / f"{scheme.lower()}-{shape}")
            if step(f"{scheme} model_free", DATA_FREE, [str(src), str(built), scheme], src):
                step(f"{scheme} evaluation", EVALUATE, ["llmcompressor", str(built), str(out), ppl], built)
        types = [t for t in args.gguf.split(",") if t]
        if types:
            folder = fresh(work / f"gguf-{shape}")
            folder.mkdir()
            f16 = folder / "model-F16.gguf"
            if not step("GGUF F16 conversion", GGUF_CONVERT, [str(src), str(f16)], src):
                continue
            imatrix = folder / "imatrix.gguf"
            if any(LlamaCppVariant(name="v", backend="llamacpp", type=t).uses_imatrix() for t in types) and not step(
                    f"importance matrix ({args.samples} x {args.seq_len} tokens)", GGUF_IMATRIX,
                    [str(src), str(f16), str(imatrix), str(valid), str(args.samples), str(args.seq_len)], f16):
                continue
            for kind in types:
                target = folder / kind / f"model-{kind}.gguf"  # a file per folder, as the stage writes it
                target.parent.mkdir()
                uses = LlamaCppVariant(name="v", backend="llamacpp", type=kind).uses_imatrix()
                if step(f"GGUF {kind}" + (" (imatrix)" if uses else ""), GGUF_QUANTIZE,
                        [str(f16), str(target), kind, str(imatrix) if uses else "-"], f16):
                    step(f"GGUF {kind} evaluation (llama.cpp)", EVALUATE, ["llamacpp", str(target.parent), str(out), ppl],
                         target)

    print(f"\n| shape | parameters | wall s | forward s | s / token | GFLOP/s | peak anon GiB | peak RSS GiB | cgroup peak GiB "
          f"(limit {args.limit_gb:g}) | memory model GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape, r in rows.items():
        per_token = r["forward_s"] / r["tokens_scored"]
        flops = 2 * r["parameters"] * r["tokens_scored"] / r["forward_s"] / 1e9
        print(f"| {shape} | {r['parameters'] / 1e9:.2f} B | {r['wall_s']:.0f} | {r['forward_s']:.0f} | {per_token:.3f} | "
              f"{flops:.0f} | {r['anon_mb'] / 1024:.2f} | {r['rss_mb'] / 1024:.2f} | {(r['cgroup_mb'] or 0) / 1024:.2f} | "
              f"{r['model_gb']:.2f} |")
    if steps:
        print(f"\n| shape | step | exit | wall s | peak anon GiB | peak RSS GiB | cgroup peak GiB (limit {args.limit_gb:g}) | result |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for shape, label, q in steps:
            result = _result(q)
            print(f"| {shape} | {label} | {q['exit']} | {q['wall_s']:.0f} | {q['anon_mb'] / 1024:.2f} | "
                  f"{q['rss_mb'] / 1024:.2f} | {(q['cgroup_mb'] or 0) / 1024:.2f} | {result} |")
    if len(rows) >= 2:
        first, last = list(rows.values())[0], list(rows.values())[-1]
        names = list(rows)
        print(f"\n{names[-1]} / {names[0]}: peak anonymous {last['anon_mb'] / first['anon_mb']:.2f}x (target <= 1.3), "
              f"seconds per token {(last['forward_s'] / last['tokens_scored']) / (first['forward_s'] / first['tokens_scored']):.2f}x "
              f"for {last['parameters'] / first['parameters']:.2f}x the parameters (the arithmetic floor's ratio)")


if __name__ == "__main__":
    main()
