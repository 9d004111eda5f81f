"""Cross-check: modelbuild's KL divergence against llama.cpp's own ``llama-perplexity
--kl-divergence``, on the same tokens, for GGUF files of one model.

llama-perplexity scores the second half of each ``ctx``-token chunk of a text (positions
ctx/2 .. ctx-2 predicting the next token), against base log-probabilities it saved from a
reference model (F16 here) in a compressed form. This script runs the tool for each quantized file,
then computes the same quantities with modelbuild's evaluation path (llama.cpp logits through
llama-cpp-python, KL(base || quantized) in float64) over exactly those positions, and prints both.

Usage: .venv/bin/python benchmarks/gguf_kld_crosscheck.py F16.gguf Q.gguf [Q2.gguf ...] [--chunks 8]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = REPO / "evals" / "data" / "wikitext-2" / "test.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("quantized", type=Path, nargs="+")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from pipeline.backends.llamacpp import LlamaEval
    from pipeline.toolchains import llamacpp

    chain = llamacpp.find()
    perplexity = chain.tool("llama-perplexity")
    text = TEST.read_text(encoding="utf-8")[:400_000]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "test.txt"
        corpus.write_text(text, encoding="utf-8")
        logits_file = Path(tmp) / "base.kld"
        common = ["-f", str(corpus), "-c", str(args.ctx), "--chunks", str(args.chunks), "-t", "2", "-b", str(args.ctx)]
        _run([perplexity, "-m", args.base, *common, "--kl-divergence-base", logits_file])
        tool = {q: _parse(_run([perplexity, "-m", q, *common, "--kl-divergence-base", logits_file, "--kl-divergence"]))
                for q in args.quantized}

    llama_cpp = llamacpp.import_bindings(chain)
    vocab = llama_cpp.Llama(model_path=str(args.base), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    vocab.close()
    windows = torch.tensor(tokens[: args.chunks * args.ctx]).view(args.chunks, args.ctx)
    first = args.ctx // 2

    def logprobs(path: Path) -> list:
        engine = LlamaEval(path, threads=2)
        out = [torch.log_softmax(engine(w[None])[first:-1].double(), -1) for w in windows]
        engine.close()
        return out

    base = logprobs(args.base)
    print(f"{args.chunks} chunks x {args.ctx} tokens, {args.chunks * (args.ctx - 1 - first)} scored positions")
    print("| file | llama-perplexity mean KLD | modelbuild mean KLD | ratio | llama-perplexity PPL | modelbuild PPL |")
    print("| --- | --- | --- | --- | --- | --- |")
    for q in args.quantized:
        ours = logprobs(q)
        kld = torch.cat([(b.exp() * (b - o)).sum(-1) for b, o in zip(base, ours)])
        targets = torch.cat([w[first + 1:] for w in windows])
        nll = -torch.cat(ours).gather(-1, targets[:, None]).squeeze(-1)
        ppl = float(torch.exp(nll.mean()))
        t = tool[q]
        print(f"| {q.name} | {t['kld']:.5f} | {float(kld.mean()):.5f} | {float(kld.mean()) / t['kld']:.3f} | "
              f"{t['ppl']:.3f} | {ppl:.3f} |")


def _run(cmd: list) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{cmd[0]} failed: {proc.stderr[-1500:]}")
    return proc.stdout + proc.stderr


def _parse(output: str) -> dict:
    kld = re.search(r"Mean\s+KLD:\s+([0-9.]+)", output)
    ppl = re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", output)
    if kld is None or ppl is None:
        sys.exit(f"cannot read llama-perplexity's KLD output:\n{output[-1500:]}")
    return {"kld": float(kld.group(1)), "ppl": float(ppl.group(1))}


if __name__ == "__main__":
    main()
