"""Benchmark: the Ray executor with 1 node vs 2 nodes on a many-variant recipe, beside the local
executor, each from an empty cache, measured side by side in one run.

A small random Llama (4 layers, hidden 256, a BPE tokenizer trained on WikiText-2 valid) and eight
data-free variants, each evaluated on the eval text. The cluster is started here: `ray start
--head` with one CPU, and for the 2-node run a second node (`ray start --address`) with one CPU,
both on loopback. Ray gives each task one CPU and one intra-op thread (it sets OMP_NUM_THREADS to
the task's CPUs); the local executor runs one stage at a time with every core.

Usage:
    .venv/bin/python benchmarks/ray_scaling.py [--workdir DIR] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, measure

RAY = str(Path(sys.executable).parent / "ray")
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
WIKITEXT = REPO / "evals" / "data" / "wikitext-2"
VARIANTS = [("fp8", "FP8_DYNAMIC", None), ("w8a16-g32", "W8A16", 32), ("w8a16-g64", "W8A16", 64),
            ("w4a16-g32", "W4A16", 32), ("w4a16-g64", "W4A16", 64), ("w4a16-g128", "W4A16", 128),
            ("nvfp4a16", "NVFP4A16", None), ("mxfp4a16", "MXFP4A16", None)]


def make_model(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([(WIKITEXT / "valid.txt").read_text(encoding="utf-8")[:400_000]],
                            trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=True, torch_dtype="bfloat16")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)


def write_recipe(folder: Path, model: Path, tokens: int) -> Path:
    variants = "".join(f"  - name: {n}\n    backend: llmcompressor\n    scheme: {s}\n" + (f"    group_size: {g}\n" if g else "")
                       for n, s, g in VARIANTS)
    path = folder / "recipe.yaml"
    path.write_text(f"name: ray-bench\nsource: {{kind: local, path: {model}}}\n"
                    f"eval:\n  corpus: {WIKITEXT / 'test.txt'}\n  tokens: {tokens}\n  seq_len: 512\n"
                    f"  gate: {{max_kld: 5.0}}\nvariants:\n{variants}")
    return path


def start_cluster(nodes: int, temp: Path) -> tuple[str, list[subprocess.Popen]]:
    port = 6400 + nodes
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                    "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp)],
                   check=True, env=ENV, capture_output=True)
    extra = [subprocess.Popen([RAY, "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--node-ip-address",
                               "127.0.0.1", "--block"], env=ENV, cwd="/", start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(nodes - 1)]
    probe = f"import ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    for _ in range(120):
        out = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().endswith(str(nodes)):
            break
        time.sleep(1)
    else:
        sys.exit(f"the {nodes}-node cluster did not come up")
    return f"127.0.0.1:{port}", extra


def stop_cluster(extra: list[subprocess.Popen]) -> None:
    for p in extra:
        p.terminate()
    subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True)


def run(recipe: Path, work: Path, label: str, *extra: str) -> float:
    cache, store = work / f"cache-{label}", work / f"store-{label}"
    r = measure([sys.executable, "-m", "pipeline", "run", str(recipe), "--cache-dir", str(cache), "--storage", str(store),
                 "--report-dir", str(work / f"reports-{label}"), *extra])
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    return r["wall_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ray-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    make_model(work / "model")
    recipe = write_recipe(work, work / "model", args.tokens)
    times = {"local executor (2 cores, one stage at a time)": run(recipe, work, "local")}
    for nodes in (1, 2):
        address, extra = start_cluster(nodes, Path(f"/tmp/ray-bench-{os.getpid()}"))
        try:
            times[f"ray, {nodes} node(s) x 1 CPU"] = run(recipe, work, f"ray{nodes}", "--executor", "ray",
                                                           "--address", address)
        finally:
            stop_cluster(extra)
    print(f"{len(VARIANTS)} variants, eval {args.tokens} tokens each, {os.cpu_count()} cores")
    for label, seconds in times.items():
        print(f"  {label:<48} {seconds:7.1f} s")
    one, two = times["ray, 1 node(s) x 1 CPU"], times["ray, 2 node(s) x 1 CPU"]
    local = times["local executor (2 cores, one stage at a time)"]
    print(f"  speedup 2 nodes vs 1 node: {one / two:.2f}x; 2 nodes vs local executor: {local / two:.2f}x")


if __name__ == "__main__":
    main()
