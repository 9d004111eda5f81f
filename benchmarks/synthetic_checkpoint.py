"""Write a synthetic checkpoint: random bf16 weights with a real model's shapes
(``pipeline.sources.synthetic``), byte-identical for the same shape and seed.

Usage:
    .venv/bin/python benchmarks/synthetic_checkpoint.py --shape llama-3.1-8b --out DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import REPO

sys.path.insert(0, str(REPO))

from pipeline.errors import ModelbuildError  # noqa: E402
from pipeline.sources import synthetic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(synthetic.SHAPES))
    ap.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-gb", type=float, default=synthetic.DEFAULT_SHARD_BYTES / 1e9)
    args = ap.parse_args()
    started = time.perf_counter()
    try:
        done = synthetic.write(args.shape, args.out, seed=args.seed, max_shard_bytes=int(args.max_shard_gb * 1e9))
    except ModelbuildError as e:
        sys.exit(f"error: {e}")
    print(f"{args.shape}: {done['parameters'] / 1e9:.2f}e9 parameters, {done['bytes'] / 1e9:.2f} GB bf16 in "
          f"{done['shards']} shards, written to {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
