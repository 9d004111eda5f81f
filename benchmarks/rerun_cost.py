"""What a rerun costs once the demo is built: the no-op rerun of the whole demo recipe, and a
change to one variant against building that variant alone.

- no-op: ``modelbuild run`` of the full demo recipe (28 variants) on a cache and store that already
  hold all of it; target ≤ 5 s.
- one variant changed (``w8a16``'s group size 64 → 32): the full demo recipe with that change
  against a recipe holding only the changed variant, each on its own copy of the same cache (hard
  links: cache entries are immutable), order alternated, medians; target: the full recipe costs
  ≤ the variant's own cost + 5%.

The cache must hold the demo's stages (a `modelbuild run recipes/smollm2-135m-instruct.yaml` into it).

    python benchmarks/rerun_cost.py --cache ~/.cache/modelbuild --work /tmp/rerun-bench
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
from pathlib import Path

import yaml
from _common import REPO, measure

DEMO = REPO / "recipes" / "smollm2-135m-instruct.yaml"
VARIANT, FIELD, OLD, NEW = "w8a16", "group_size", 64, 32


def _run(recipe: Path, cache: Path, store: Path) -> float:
    cmd = [str(REPO / ".venv" / "bin" / "python"), "-m", "pipeline", "run", str(recipe), "--cache-dir", str(cache),
           "--storage", str(store), "--report-dir", str(store.parent / "reports")]
    return measure(cmd)["wall_s"]


def _copy(cache: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["cp", "-al", str(cache), str(dest)], check=True)  # hard links: entries are immutable
    return dest


def _changed(recipe: Path, folder: Path, only: bool) -> Path:
    data = yaml.safe_load(recipe.read_text())
    for v in data["variants"]:
        if v["name"] == VARIANT:
            assert v[FIELD] == OLD, v
            v[FIELD] = NEW
    if only:
        data["variants"] = [v for v in data["variants"] if v["name"] == VARIANT]
    path = folder / (("only-" if only else "full-") + "changed.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="a cache holding the demo's stages")
    parser.add_argument("--work", type=Path, default=Path("/tmp/rerun-bench"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(DEMO.read_text())  # the demo, with its data paths made absolute
    for section, key in (("calibration", "path"), ("eval", "corpus")):
        data[section][key] = str((DEMO.parent / data[section][key]).resolve())
    demo = args.work / "demo.yaml"
    demo.write_text(yaml.safe_dump(data, sort_keys=False))

    base = _copy(args.cache, args.work / "noop-cache")
    store = args.work / "noop-store"
    shutil.rmtree(store, ignore_errors=True)
    first = _run(demo, base, store)  # publishes (hard links) what the cache holds
    noop = [_run(demo, base, store) for _ in range(args.repeat)]
    print(f"demo ({len(data['variants'])} variants): first run on a full cache {first:.1f} s (publishes); "
          f"no-op rerun median {statistics.median(noop):.2f} s over {args.repeat} (target ≤ 5 s)")

    full, only = _changed(demo, args.work, False), _changed(demo, args.work, True)
    rows: dict[str, list[float]] = {"full": [], "only": []}
    for i in range(args.repeat):
        sides = [("full", full), ("only", only)]
        for name, recipe in sides if i % 2 == 0 else sides[::-1]:
            # From the no-op side's cache: everything a finished demo run leaves, plan-time checks included.
            cache = _copy(base, args.work / f"{name}-cache")
            store = args.work / f"{name}-store"
            shutil.rmtree(store, ignore_errors=True)
            rows[name].append(_run(recipe, cache, store))
    f, o = statistics.median(rows["full"]), statistics.median(rows["only"])
    print(f"{VARIANT} {FIELD} {OLD} → {NEW}: full demo recipe {f:.1f} s, that variant alone {o:.1f} s "
          f"→ {f / o:.3f}× (target ≤ 1.05×); medians of {args.repeat}, order alternated")


if __name__ == "__main__":
    main()
