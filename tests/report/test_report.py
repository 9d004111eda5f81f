"""The tradeoff report and the model cards: built from what a real run published (vLLM and GGUF
variants of a tiny model), rendered to Markdown and self-contained HTML, seen in headless
Chromium; recommendations; the bad inputs (nothing published, missing metrics, corrupt manifest)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.backends.test_llamacpp import gguf_recipe
from tests.conftest import REPO

VARIANTS = """\
    - name: fp8
      backend: llmcompressor
      scheme: FP8_DYNAMIC
    - name: w4a16
      backend: llmcompressor
      scheme: W4A16
      group_size: 32
    - name: gguf-f16
      backend: llamacpp
      type: F16
    - name: gguf-q8
      backend: llamacpp
      type: Q8_0
    - name: gguf-q4_0
      backend: llamacpp
      type: Q4_0
"""
NAMES = ["fp8", "w4a16", "gguf-f16", "gguf-q8", "gguf-q4_0"]


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=dict(os.environ), timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_smol, wikitext):
    """One run of a recipe with vLLM and GGUF variants into a filesystem store."""
    root = tmp_path_factory.mktemp("report")
    recipe = gguf_recipe(root, tiny_smol, wikitext, VARIANTS, name="tiny-smol")
    extra = textwrap.dedent("""\
        targets:
          - {gpu: H100}
        report:
          targets:
            - {engine: vllm, gpu: H100}
            - {engine: llamacpp, gpu: cpu, max_gb: 0.0035}
            - {engine: vllm, gpu: T4, max_kld: 0.0000001}
    """)
    recipe.write_text(recipe.read_text() + extra)
    done = _cli("run", recipe, "--cache-dir", root / "cache", "--storage", root / "store")
    assert done.returncode == 0, done.stderr
    return {"root": root, "recipe": recipe, "store": root / "store"}


def _versions(store: Path, variant: str) -> Path:
    [folder] = [p for p in (store / "tiny-smol" / variant).iterdir() if (p / "manifest.json").is_file()]
    return folder


def test_report_from_a_recipe_has_every_variant_plots_and_recommendations(built, tmp_path):
    out = tmp_path / "rep"
    done = _cli("report", built["recipe"], "--storage", built["store"], "--out", out)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "size_vs_kld.png",
                                                      "speed_vs_kld.png"]
    data = json.loads((out / "report.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert sorted(rows) == sorted(NAMES)
    manifests = {v: json.loads((_versions(built["store"], v) / "manifest.json").read_text()) for v in NAMES}
    for name, row in rows.items():
        # Every figure is the manifest's own, not recomputed or invented.
        assert row["metrics"]["mean_kld"] == manifests[name]["metrics"]["mean_kld"]
        assert row["size_bytes"] == manifests[name]["size_bytes"]
    # Speed where llama-bench ran (GGUF on this CPU); the vLLM formats' estimated on the target
    # GPU from their own files and the model's shape, never measured.
    assert rows["fp8"]["speed"] is None and rows["w4a16"]["speed"] is None
    for name in ("fp8", "w4a16"):
        m, est = manifests[name], rows[name]["estimates"]["H100"]
        shape = m["architecture"]
        weights = sum(f["size"] for f in m["files"] if f["path"].endswith(".safetensors"))
        weights -= 0 if shape["tied_embeddings"] else 2 * shape["embedding_params"]
        kv = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2 * 1024
        assert est["kind"] == "estimate" and est["decode_tps"] == pytest.approx(0.7 * 3350e9 / (weights + kv))
        peak = {"fp8": 1979e12, "w4a16": 989e12}[name]  # FP8 matmuls; W4A16 dequantizes to 16-bit
        flops = 2 * shape["matmul_params"] + 4 * shape["layers"] * shape["attention_heads"] * shape["head_dim"] * 512
        assert est["compute"] == {"fp8": "fp8", "w4a16": "16-bit"}[name]
        assert est["prefill_tps"] == pytest.approx(0.5 * peak / flops)
    # Four-bit weights read fewer bytes than eight-bit ones.
    assert rows["w4a16"]["estimates"]["H100"]["decode_tps"] > rows["fp8"]["estimates"]["H100"]["decode_tps"]
    q4 = rows["gguf-q4_0"]
    assert q4["speed"]["tg_range"][0] <= q4["speed"]["tg_tps"] <= q4["speed"]["tg_range"][1]
    assert q4["speed"]["load"]["attempts"] >= 1 and q4["speed"]["load"]["other_cores"] >= 0
    assert q4["speed"]["tg_tps"] == manifests["gguf-q4_0"]["speed"]["tg8_tps"] and q4["speed"]["hardware"]
    assert q4["speedup"]["reference"] == "gguf-f16"
    assert q4["speedup"]["tg"] == pytest.approx(q4["speed"]["tg_tps"] / rows["gguf-f16"]["speed"]["tg_tps"])
    md = (out / "report.md").read_text()
    assert md.count("\n| fp8 |") == 2 and "est. " in md and "Speed estimated, not measured, for 2 variant(s)" in md
    assert "![" in md
    # Recommendations follow select's rule: lowest mean KLD among what fits.
    recs = {r["target"]: r for r in data["recommendations"]}
    vllm_h100 = recs["vLLM on H100"]
    best = min(("fp8", "w4a16"), key=lambda v: rows[v]["metrics"]["mean_kld"])
    assert vllm_h100["variant"] == best and "lowest mean KLD" in vllm_h100["reason"]
    # The fastest within the quality floor (0.05 by default): the least estimated time for a chat
    # turn (1,024 prompt tokens read, 128 written).
    within = [v for v in ("fp8", "w4a16") if rows[v]["metrics"]["mean_kld"] <= 0.05]
    if within:
        turn = {v: 1024 / e["prefill_tps"] + 128 / e["decode_tps"] for v in within if (e := rows[v]["estimates"]["H100"])}
        fastest = min(turn, key=turn.get)
        assert vllm_h100["fastest"] == fastest and "estimated" in vllm_h100["fastest_reason"]
    else:
        assert vllm_h100["fastest"] is None and "none of them" in vllm_h100["fastest_reason"]
    cpu = recs["llama.cpp on CPU (≤ 0.0035 GB)"]
    fitting = [v for v in ("gguf-f16", "gguf-q8", "gguf-q4_0") if rows[v]["size_bytes"] <= 0.0035e9]
    assert cpu["variant"] == (min(fitting, key=lambda v: rows[v]["metrics"]["mean_kld"]) if fitting else None)
    select = _cli("select", "--engine", "llamacpp", "--gpu", "cpu", "--max-gb", "0.0035", "--storage", built["store"],
                  "--json")
    if fitting:
        assert json.loads(select.stdout)["variant"] == cpu["variant"]
    # On the CPU the fastest is by measured generation speed, among those within the floor.
    quick = [v for v in fitting if rows[v]["metrics"]["mean_kld"] <= 0.05]
    if quick:
        turn = {v: 1024 / rows[v]["speed"]["pp_tps"] + 128 / rows[v]["speed"]["tg_tps"] for v in quick}
        assert cpu["fastest"] == min(turn, key=turn.get) and "measured" in cpu["fastest_reason"]
    t4 = recs["vLLM on T4 (mean KLD ≤ 1e-07)"]
    assert t4["variant"] is None and t4["reason"].startswith("nothing fits:")


def test_report_by_model_name_with_targets_from_the_command_line(built, tmp_path):
    out = tmp_path / "by-name"
    done = _cli("report", "tiny-smol", "--storage", built["store"], "--out", out, "--target", "llamacpp:cpu")
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "report.json").read_text())
    assert [r["target"] for r in data["recommendations"]] == ["llama.cpp on CPU"]
    bad = _cli("report", "tiny-smol", "--storage", built["store"], "--out", out, "--target", "vllm:cpu")
    assert bad.returncode == 2 and "--target" in bad.stderr and "does not run on a CPU" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_no_speed_measured_means_no_speed_plot(tmp_path):
    """A store of GPU-only formats (nothing ran them here): the size plot, no speed plot, and the
    report says why."""
    from tests.storage.test_storage import _publish

    store = str(tmp_path / "store")
    _publish(store, tmp_path, "fp8", "a", kld=0.03, size=4000)
    _publish(store, tmp_path, "w4", "b", kld=0.2, size=2000)
    out = tmp_path / "rep"
    done = _cli("report", "m", "--storage", store, "--out", out)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md", "size_vs_kld.png"]
    md = (out / "report.md").read_text()
    # Published without the model's serving shape: not estimated either, and the report says why.
    assert "Speed not measured for 2 variant(s) (fp8, w4), nor estimated: the manifest lacks" in md and "vLLM on H100" in md


def test_pareto_frontier():
    from pipeline.report.pareto import frontier

    points = [(0.1, 5.0), (0.2, 3.0), (0.15, 6.0), (0.5, 1.0), (0.5, 2.0), (0.1, 5.0)]
    assert frontier(points) == [0, 5, 1, 3]


def test_each_engine_has_its_own_frontier():
    """A llama.cpp user chooses among GGUF files: a GGUF dominated by a vLLM variant is still on
    llama.cpp's frontier; a checkpoint two engines load can be on both frontiers."""
    from pipeline.report.pareto import frontiers_by_engine

    points = [(0.01, 0.17), (0.03, 0.17), (0.02, 0.18), (0.2, 0.12), (0.05, 0.10)]
    loaded_by = [["vllm"], ["trtllm", "vllm"], ["llamacpp"], ["trtllm", "vllm"], ["llamacpp"]]
    assert frontiers_by_engine(points, loaded_by) == {"vllm": [0, 3], "trtllm": [1, 3], "llamacpp": [2, 4]}


# The demo's 28 variants as docs/quality.md measured them: (name, mean KLD, size GB, engines).
_V, _T, _L = ["vllm"], ["trtllm"], ["llamacpp"]
DEMO_POINTS = [
    ("w8a16", 0.0017, 0.1698, _V), ("w8a8-sq-gptq", 0.0134, 0.1668, _V), ("fp8-dynamic", 0.0263, 0.1668, _V),
    ("fp8-static", 0.0316, 0.1665, _V), ("w4a16-awq", 0.1564, 0.1176, _V), ("nvfp4a16", 0.2023, 0.1200, _V),
    ("w4a16-gptq", 0.2272, 0.1167, _V), ("nvfp4", 0.3933, 0.1200, _V), ("mxfp4a16", 0.4139, 0.1167, _V),
    ("mxfp4", 1.0835, 0.1167, _V), ("modelopt-fp8", 0.0314, 0.1665, ["trtllm", "vllm"]),
    ("modelopt-fp8-kv-fp8", 0.0366, 0.1665, ["trtllm", "vllm"]), ("modelopt-fp8-pc-pt", 0.0262, 0.1671, ["trtllm", "vllm"]),
    ("modelopt-int8-sq", 0.0899, 0.1674, ["trtllm-engine"]), ("modelopt-nvfp4-mlp-only", 0.2473, 0.1582, _T),
    ("modelopt-int4-awq", 0.2501, 0.1201, _T), ("modelopt-nvfp4", 0.3975, 0.1200, ["trtllm", "vllm"]),
    ("gguf-f16", 0.0000004, 0.2709, _L), ("gguf-bf16", 0.0001, 0.2709, _L), ("gguf-q8_0", 0.0040, 0.1448, _L),
    ("gguf-q6_k", 0.0094, 0.1384, _L), ("gguf-q5_k_m", 0.0739, 0.1121, _L), ("gguf-q4_k_m", 0.0328, 0.1055, _L),
    ("gguf-q4_k_m-no-imatrix", 0.0520, 0.1055, _L), ("gguf-q4_0", 0.1784, 0.0919, _L),
    ("gguf-iq4_xs", 0.0910, 0.0909, _L), ("gguf-q3_k_m", 0.0854, 0.0935, _L), ("gguf-q2_k", 0.2688, 0.0882, _L),
]


def test_plot_labels_do_not_overlap_on_the_demo():
    """The demo's size plot: its rendered label boxes are measured, and no two overlap and none
    leaves the axes; the same labels left at their points do overlap (so the check can fail)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.report.plots import label_collisions, scatter_figure

    fig = scatter_figure(DEMO_POINTS, x_label="mean KLD", y_label="size on disk (GB)", title="demo")
    assert len(fig.axes[0].texts) == len(DEMO_POINTS)
    assert label_collisions(fig) == (0, 0)

    unplaced = Figure(figsize=(10, 6.5), dpi=110)
    FigureCanvasAgg(unplaced)
    ax = unplaced.subplots()
    ax.set_xscale("log")
    ax.scatter([p[1] for p in DEMO_POINTS], [p[2] for p in DEMO_POINTS])
    for label, x, y, _ in DEMO_POINTS:
        ax.text(x, y, label, fontsize=7)
    assert label_collisions(unplaced)[0] > 5


def test_model_cards_have_valid_front_matter(built):
    from huggingface_hub import ModelCard

    for name in NAMES:
        folder = _versions(built["store"], name)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert "README.md" in {f["path"] for f in manifest["files"]}  # covered by the manifest's sha256s
        text = (folder / "README.md").read_text()
        card = ModelCard(text)  # huggingface_hub's own parser of the front matter
        data = card.data.to_dict()
        assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert data["base_model_relation"] == "quantized" and data["quantized_by"] == "modelbuild"
        assert data["license"] == "apache-2.0" and data["pipeline_tag"] == "text-generation"
        engine_tag = "llama.cpp" if name.startswith("gguf") else "vllm"
        assert engine_tag in data["tags"]
        # Figures and serve commands are the manifest's.
        from pipeline.figures import kld
        assert kld(manifest["metrics"]["mean_kld"]) in card.text
        for command in manifest["serve"].values():
            assert command in card.text
    tags = {n: ModelCard((_versions(built["store"], n) / "README.md").read_text()).data.tags for n in NAMES}
    assert {"fp8", "compressed-tensors", "llm-compressor"} <= set(tags["fp8"])
    assert {"w4a16", "int4"} <= set(tags["w4a16"]) and {"gguf", "q4_0"} <= set(tags["gguf-q4_0"])
    assert "library_name" not in ModelCard((_versions(built["store"], "gguf-q8") / "README.md").read_text()).data.to_dict()
    assert _cli("verify", _versions(built["store"], "fp8")).returncode == 0


def test_model_card_tags():
    from pipeline.publishing.model_card import tags

    def m(scheme, backend, bits, engines, algorithm=None):
        spec = {"backend": backend, **({"algorithm": algorithm} if algorithm else {})}
        return {"format": {"scheme": scheme, "weight_bits": bits, "engines": engines}, "variant_spec": spec}

    assert tags(m("W8A8", "llmcompressor", 8, ["vllm"], "gptq")) == [
        "quantized", "llm-compressor", "compressed-tensors", "w8a8", "int8", "gptq", "vllm"]
    assert "nvfp4" in tags(m("NVFP4", "llmcompressor", 4, ["vllm"])) and "fp4" in tags(m("NVFP4", "llmcompressor", 4, ["vllm"]))
    assert tags(m("FP8+FP8_KV", "modelopt", 8, ["trtllm", "vllm"])) == ["quantized", "modelopt", "fp8", "tensorrt-llm", "vllm"]
    assert tags(m("Q4_K_M", "llamacpp", 4.5, ["llamacpp"])) == ["quantized", "gguf", "q4_k_m", "llama.cpp"]


# -- bad input ----------------------------------------------------------------------------------


def test_a_model_with_nothing_published(built, tmp_path):
    bad = _cli("report", "no-such-model", "--storage", built["store"], "--out", tmp_path / "x")
    assert bad.returncode == 2 and "no published variants of 'no-such-model'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    empty = _cli("report", "tiny-smol", "--storage", tmp_path / "empty-store", "--out", tmp_path / "y")
    assert empty.returncode == 2 and "no published variants" in empty.stderr and not (tmp_path / "y").exists()


def _copy_store(built, tmp_path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(built["store"], store)
    for p in store.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)  # published files are read-only
    return store


def test_a_variant_missing_metrics_is_marked(built, tmp_path):
    """A manifest without some figures (e.g. published by an older tool) is shown, marked."""
    from pipeline.hashing import digest_bytes
    from pipeline.storage.location import open_storage
    from pipeline.storage.registry import entry_from_manifest, read_index

    store = _copy_store(built, tmp_path)
    path = _versions(store, "w4a16") / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["metrics"]["mean_kld"], manifest["metrics"]["p99_kld"]
    raw = json.dumps(manifest).encode()
    path.write_bytes(raw)
    index = read_index(open_storage(str(store)))
    index["entries"] = [entry_from_manifest(manifest, raw) if e["variant"] == "w4a16" else e for e in index["entries"]]
    (store / "index.json").write_text(json.dumps(index))
    assert entry_from_manifest(manifest, raw)["manifest_sha256"] == digest_bytes(raw)
    out = tmp_path / "rep"
    done = _cli("report", "tiny-smol", "--storage", store, "--out", out)
    assert done.returncode == 0, done.stderr
    md = (out / "report.md").read_text()
    [line] = [ln for ln in md.splitlines() if ln.startswith("| w4a16 |") and "missing:" in ln]
    assert "missing: mean_kld, p99_kld" in line and "not measured" in line
    assert "Metrics missing for w4a16" in md


def test_a_corrupt_manifest_is_named(built, tmp_path):
    store = _copy_store(built, tmp_path)
    path = _versions(store, "gguf-q8") / "manifest.json"
    path.write_text(path.read_text().replace('"metrics"', '"metrixs"', 1))
    out = tmp_path / "rep"
    bad = _cli("report", "tiny-smol", "--storage", store, "--out", out)
    assert bad.returncode == 5 and "corrupt manifest" in bad.stderr and str(path) in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not out.exists()
    path.write_text("{not json")
    bad = _cli("report", "tiny-smol", "--storage", store, "--out", out)
    assert bad.returncode == 5 and str(path) in bad.stderr and not out.exists()


# -- seen in a browser --------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_report_renders_in_headless_chromium(built, tmp_path):
    """Debian's Chromium (installed by .ci/setup) driven by Playwright: the tables have a row per
    variant, both plots are decoded images with a size and are on screen; the screenshot is kept
    as a test artifact (MODELBUILD_TEST_ARTIFACTS, else the test's temp folder)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is missing: bash .ci/setup installs Debian's chromium package"
    out = tmp_path / "rep"
    assert _cli("report", built["recipe"], "--storage", built["store"], "--out", out).returncode == 0
    page_html = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page_html)  # self-contained: nothing to fetch
    artifacts = Path(os.environ.get("MODELBUILD_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                    chromium_sandbox=False)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "report.html").as_uri())
            assert page.locator("#variants tbody tr").count() == len(NAMES)
            assert page.locator("#summary tbody tr").count() == len(NAMES)
            assert page.locator("#variants").is_visible() and page.locator("#recommendations li").count() == 3
            for plot in ("#plot-size_vs_kld", "#plot-speed_vs_kld"):
                img = page.locator(plot)
                img.scroll_into_view_if_needed()
                assert img.is_visible()
                width, height = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
                assert width > 300 and height > 200
                box = img.bounding_box()
                assert box["width"] > 300 and box["height"] > 200
            page.goto((out / "report.html").as_uri())
            shot = artifacts / "report-screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert requests == [(out / "report.html").as_uri()] * 2  # the page fetched nothing else
    assert shot.stat().st_size > 20_000
    # The embedded plot is a real PNG of the drawn figure, not an empty image.
    png = base64.b64decode(re.search(r'id="plot-size_vs_kld"[^>]*src="data:image/png;base64,([^"]+)"', page_html).group(1))
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
        assert im.size[0] > 300 and colours is not None and len(colours) > 10
