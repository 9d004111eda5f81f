"""Over-memory end to end: a Llama-3.2-1B-shaped checkpoint (2.47 GB in bf16) built by
``modelbuild run`` inside a memory cgroup whose limit, page cache included, is below the
checkpoint's size: baseline, one data-free llm-compressor scheme (FP8_DYNAMIC through
``model_free``) and one GGUF type (Q8_0), evaluated on 256 tokens.

The run is a child process that joins the cgroup before it starts; the checkpoint is evicted from
the page cache first, so every page the run reads is charged to it. Needs root (the cgroup): skipped
with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from benchmarks._common import MemoryCgroup, evict_from_page_cache
from tests.conftest import REPO, modelbuild_cmd

pytestmark = pytest.mark.slow

LIMIT = 2 << 30  # 2 GiB, page cache included; the checkpoint is 2.47 GB
SHAPE = "llama-3.2-1b"
# model_free quantizes a shard at a time, holding it and its output: shards well under the limit
# (the embedding matrix, 525 MB, is the largest tensor).
SHARD_BYTES = 600 * 10**6


def scale_recipe(folder: Path, checkpoint: Path, wikitext: Path) -> Path:
    recipe = folder / "scale.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        name: scale-1b
        source:
          kind: local
          path: {checkpoint}
        eval:
          corpus: {wikitext / 'test.txt'}
          tokens: 256
          seq_len: 128
          gate:
            max_ppl_ratio: 2.0
        gguf:
          speed: {{prompt_tokens: 32, gen_tokens: 4, repetitions: 1}}
        variants:
          - name: fp8
            backend: llmcompressor
            scheme: FP8_DYNAMIC
            entrypoint: model_free
          - name: q8
            backend: llamacpp
            type: Q8_0
        """), encoding="utf-8")
    return recipe


def build_under_limit(root: Path, checkpoint: Path, wikitext: Path, limit: int) -> dict:
    """``modelbuild run`` of the scale recipe in a fresh memory cgroup of ``limit`` bytes.

    Returns ``{"code", "stderr", "summary", "cgroup_peak", "oom_kills"}``; skips the test when no
    cgroup can be made."""
    cgroup = MemoryCgroup(limit)
    if not cgroup.enforced:
        pytest.skip(f"no memory limit can be enforced here: {cgroup.reason}")
    recipe = scale_recipe(root, checkpoint, wikitext)
    reports = root / "reports"
    evict_from_page_cache(checkpoint)
    with cgroup:
        cgroup.reset_peak()
        done = subprocess.run(
            [*modelbuild_cmd(), "run", str(recipe), "--cache-dir", str(root / "cache"), "--storage", str(root / "store"),
             "--report-dir", str(reports), "--device", "cpu"],
            cwd=REPO, capture_output=True, text=True, timeout=900, preexec_fn=cgroup.join,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        peak, kills = cgroup.peak(), cgroup.oom_kills()
    summary = json.loads((reports / "summary.json").read_text()) if (reports / "summary.json").is_file() else None
    return {"code": done.returncode, "stderr": done.stderr, "summary": summary, "cgroup_peak": peak, "oom_kills": kills}


def test_a_model_larger_than_memory_is_baselined_quantized_and_evaluated(tmp_path, wikitext):
    from pipeline.sources import synthetic

    checkpoint = tmp_path / SHAPE
    written = synthetic.write(SHAPE, checkpoint, max_shard_bytes=SHARD_BYTES)
    assert written["bytes"] > LIMIT  # the point: the bf16 weights alone do not fit

    run = build_under_limit(tmp_path, checkpoint, wikitext, LIMIT)
    tail = run["stderr"][-3000:]
    assert run["oom_kills"] == 0, f"killed by the {LIMIT >> 20} MiB limit:\n{tail}"
    assert run["code"] == 0, tail
    summary = run["summary"]
    variants = {row["variant"]: row for row in summary["variants"]}
    assert set(variants) == {"fp8", "q8"}
    for row in variants.values():
        assert row["status"] == "passed" and row["metrics"]["tokens_scored"] > 0, row
    stages = {row["stage"]: row for row in summary["stages"]}
    built = [row for row in stages.values() if row["status"] == "built"]
    assert {"baseline", "quantize/fp8", "evaluate/fp8", "quantize/q8", "evaluate/q8"} <= {r["stage"] for r in built}
    for row in built:  # every stage measured, each below the limit
        assert 0 < row["peak_rss_bytes"] < LIMIT, row
        assert row.get("children_peak_rss_bytes", 0) < LIMIT, row
    assert run["cgroup_peak"] is None or run["cgroup_peak"] <= LIMIT
