"""Helpers shared by the benchmark scripts (run as scripts: this folder is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(cmd: list[str]) -> dict:
    """Wall time and this child's own peak RSS (from ``wait4``) of one command; exits on failure.

    Output is drained while waiting, so full pipes never stall the child.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: dict[str, bytes] = {}
    threads = [threading.Thread(target=lambda n=n, s=s: out.__setitem__(n, s.read())) for n, s in
               (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    for t in threads:
        t.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"command failed ({code}): {' '.join(cmd[:4])}...\n{out['stderr'].decode()[-3000:]}")
    return {"wall_s": wall, "rss_mb": usage.ru_maxrss / 1024, "stdout": out["stdout"].decode(),
            "stderr": out["stderr"].decode()}


def single_variant_recipe(recipe: Path, name: str, folder: Path) -> Path:
    """The recipe reduced to one variant (relative corpus paths made absolute), written to ``folder``."""
    import yaml

    data = yaml.safe_load(recipe.read_text())
    data["variants"] = [v for v in data["variants"] if v["name"] == name]
    for section, key in (("calibration", "path"), ("eval", "corpus")):
        if section in data and key in data[section]:
            data[section][key] = str((recipe.parent / data[section][key]).resolve())
    path = folder / f"{name}-only.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def calibration_windows(recipe, variant, tokenizer) -> list[list[int]]:
    """The calibration windows a by-hand script uses: the recipe's text tokenized once,
    ``samples`` windows of ``seq_len`` tokens picked with ``seed`` (variant overrides applied),
    as an engineer would write it (the same picks modelbuild makes, computed independently)."""
    import random

    cal = recipe.calibration
    over = variant.calibration
    n = over.samples if over and over.samples else cal.samples
    length = over.seq_len if over and over.seq_len else cal.seq_len
    ids = tokenizer(Path(cal.path).read_text(), add_special_tokens=False)["input_ids"]
    picks = sorted(random.Random(cal.seed).sample(range(len(ids) // length), n))
    return [ids[w * length:(w + 1) * length] for w in picks]


# The start of a child script that runs single stages of a recipe outside `modelbuild run`:
# argv[1:4] = recipe, shared cache, scratch folder; defines `prepared`, `plan`, `ctx` and `fetch`
# (the recipe's fetch stage, from the shared cache). Stages built from it go into the scratch cache.
STAGE_SCRIPT_PROLOGUE = """
import sys, json
from pathlib import Path
from pipeline.cache.store import CacheStore
from pipeline.run.orchestrate import prepare
from pipeline.progress import Reporter
from pipeline.stages import runner
from pipeline.stages.context import RunContext, StageInput
recipe, cache, scratch = sys.argv[1:4]
reporter = Reporter()
prepared = prepare(Path(recipe), cache_dir=Path(cache), storage=None, reporter=reporter)
plan = prepared.plan
ctx = RunContext(loaded=prepared.loaded, source=plan.source, storage_root=Path(scratch), requested_device="cpu",
                 reporter=reporter, plan=plan)
fetch = prepared.store.get(plan.by_id()["fetch"].key)
assert fetch is not None, "run the recipe's fetch stage first"
"""
