"""`modelbuild init`: starter recipes sized to the model's shapes, for a folder, a Hub id (offline,
from a pre-populated cache) and a GGUF file (the demo's), that validate and plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.recipe import load_recipe
from pipeline.starter import CALIBRATION, DEMO_GATES, EVAL, EVAL_GATE, shapes_from_config, shapes_from_gguf
from tests.conftest import REPO, one_line
from tests.sources.test_sources import populate_hub_cache

DEMO = REPO / "recipes" / "smollm2-135m-instruct.yaml"


@pytest.fixture
def texts(wikitext) -> list[str]:
    return ["--eval-text", str(wikitext / "test.txt"), "--calibration-text", str(wikitext / "valid.txt")]


def _variants(path: Path) -> dict[str, object]:
    return {v.name: v for v in load_recipe(path).recipe.variants}


def test_tiny_folder_variants_fit_its_shapes(cli, tiny_model, tmp_path, texts):
    out = tmp_path / "tiny.yaml"
    code, stdout, err = cli("init", tiny_model, "-o", out, *texts)
    assert code == 0, err
    summary = one_line(err)
    assert summary.startswith(f"wrote {out}: 11 variant(s)") and "gguf-q6_k*" in summary
    variants = _variants(out)
    assert sorted(variants) == sorted(DEMO_GATES)
    # hidden 64, o_proj 4 x 16, down_proj 128: groups (and AWQ blocks) of 128 cannot divide 64.
    assert variants["w8a16"].group_size == 64 and variants["w4a16-gptq"].group_size == 64
    assert variants["w4a16-gptq"].algorithm == "gptq"
    assert variants["modelopt-int4-awq"].awq_block_size == 64
    text = out.read_text()
    assert "128 does not divide the layer widths 64/128" in text
    # Every tensor's rows (64, 128) miss the K-quants' 256-value blocks; all are multiples of 32.
    assert "15 of 15 tensors have rows of 64/128 values, not multiples of 256" in text
    assert "(q4_k -> q5_0, q6_k -> q8_0)" in text
    assert "gguf-q8_0    # 8-bit" in text and "not multiples of 32" not in text
    recipe = load_recipe(out).recipe
    assert recipe.source.kind == "local" and recipe.source.path == tiny_model.resolve()
    assert [t.gpu for t in recipe.targets] == ["L40S", "H100", "B200"]
    # The tiny model's context (1024) allows the demo's windows.
    assert (recipe.eval.seq_len, recipe.calibration.seq_len) == (512, 256)
    assert cli("validate", out)[0] == 0


def test_tiny_recipe_plans(cli, tiny_smol, tmp_path, texts):
    """The backends' own plan-time checks (group sizes dividing every layer, ModelOpt's export,
    llama.cpp's converter, which must know the tokenizer: SmolLM2's) accept what init chose."""
    out = tmp_path / "tiny.yaml"
    assert cli("init", tiny_smol, "-o", out, *texts)[0] == 0
    code, stdout, err = cli("plan", out)
    assert code == 0, err
    assert "quantize/w4a16-gptq" in stdout and "quantize/gguf-q4_k_m" in stdout


def test_config_shapes_match_the_meta_model(tiny_model):
    """The widths read from config.json as JSON are the ones the backends' checks measure on the
    real (meta-device) architecture."""
    from transformers import AutoConfig

    from pipeline.backends.shapes import linear_input_widths

    config = json.loads((tiny_model / "config.json").read_text())
    shapes = shapes_from_config(config, "config.json")
    assert sorted(shapes.linear_widths) == sorted(linear_input_widths(AutoConfig.from_pretrained(tiny_model), ("lm_head",)))
    assert (shapes.hidden, shapes.layers, shapes.heads, shapes.kv_heads) == (64, 2, 4, 2)
    # Tied embeddings: no output.weight in the GGUF, token_embd plus 7 matrices per layer.
    assert len(shapes.gguf_rows) == 1 + 2 * 7 and ("output.weight", 64) not in shapes.gguf_rows


def test_relative_paths_resolve_from_the_recipe_folder(cli, tiny_model, tmp_path, wikitext):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("test.txt", "valid.txt"):
        (data / name).write_bytes((wikitext / name).read_bytes()[:200_000])
    out = tmp_path / "recipes" / "sub" / "tiny.yaml"
    code, _, err = cli("init", tiny_model, "-o", out, "--eval-text", data / "test.txt",
                       "--calibration-text", data / "valid.txt")
    assert code == 0, err
    text = out.read_text()
    assert "corpus: ../../data/test.txt" in text and "path: ../../data/valid.txt" in text
    recipe = load_recipe(out).recipe
    assert recipe.eval.corpus == (data / "test.txt").resolve()
    assert recipe.calibration.path == (data / "valid.txt").resolve()


def test_default_text_is_the_repos_wikitext(cli, tiny_model, tmp_path, monkeypatch, wikitext):
    out = tmp_path / "tiny.yaml"
    code, _, err = cli("init", tiny_model, "-o", out)
    assert code == 0, err
    assert "note:" not in one_line(err)
    recipe = load_recipe(out).recipe
    assert recipe.eval.corpus == (REPO / "evals" / "data" / "wikitext-2" / "test.txt").resolve()
    assert recipe.calibration.path == (REPO / "evals" / "data" / "wikitext-2" / "valid.txt").resolve()
    text = out.read_text()
    assert "--eval-text" in text and "--calibration-text" in text  # the comments: point them at your own text

    # Without the repository's copy (an installed package), the recipe still validates and the
    # summary says to point the options at real text.
    monkeypatch.setattr("pipeline.starter.default_data_dir", lambda: tmp_path / "absent")
    code, _, err = cli("init", tiny_model, "-o", out, "--force")
    assert code == 0, err
    assert "note: no eval text and no calibration text at the default path" in one_line(err)
    assert load_recipe(out).recipe.eval.corpus == tmp_path / "absent" / "test.txt"


def test_gpus_select_formats(cli, tiny_model, tmp_path, texts):
    out = tmp_path / "t4.yaml"
    code, _, err = cli("init", tiny_model, "-o", out, "--gpu", "T4", *texts)
    assert code == 0, err
    names = set(_variants(out))
    # Turing (7.5): vLLM's INT formats only; no TensorRT-LLM format (INT4 AWQ needs 8.0 to 10.0).
    assert {n for n in names if not n.startswith("gguf-")} == {"w8a16", "w4a16-gptq"}
    text = out.read_text()
    assert "left out: fp8-dynamic: vLLM runs it on compute capability 8.9+; the targets are T4 (7.5)" in text
    assert "left out: modelopt-int4-awq" in text
    assert [t.gpu for t in load_recipe(out).recipe.targets] == ["T4"]

    out = tmp_path / "hopper.yaml"
    code, _, err = cli("init", tiny_model, "-o", out, "--gpu", "h100,A100", "--engines", "trtllm", *texts)
    assert code == 0, err
    assert set(_variants(out)) == {"modelopt-fp8", "modelopt-int4-awq"}  # NVFP4 needs Blackwell
    assert [t.gpu for t in load_recipe(out).recipe.targets] == ["H100", "A100"]

    out = tmp_path / "blackwell.yaml"
    assert cli("init", tiny_model, "-o", out, "--gpu", "B200", "--engines", "vllm", "--engines", "llamacpp",
               *texts)[0] == 0
    names = set(_variants(out))
    assert "nvfp4a16" in names and "gguf-q4_k_m" in names and not any(n.startswith("modelopt") for n in names)


def test_hub_id_offline_from_the_local_cache(cli, tiny_model, tmp_path, monkeypatch, texts):
    from huggingface_hub import scan_cache_dir

    commit = "0123456789abcdef0123456789abcdef01234567"
    home = tmp_path / "hf-home"
    populate_hub_cache(home / "hub", "acme/tiny-llama", tiny_model, commit)
    # The layout is huggingface_hub's own: its cache scanner sees the repo at that commit.
    [repo] = scan_cache_dir(home / "hub").repos
    assert repo.repo_id == "acme/tiny-llama" and [r.commit_hash for r in repo.revisions] == [commit]
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("init", "acme/tiny-llama", *texts)
    assert code == 0, err
    out = tmp_path / "tiny-llama.yaml"  # the default output: <name>.yaml here
    recipe = load_recipe(out).recipe
    assert (recipe.source.kind, recipe.source.repo, recipe.source.revision) == ("hub", "acme/tiny-llama", "main")
    assert _variants(out)["w4a16-gptq"].group_size == 64

    code, _, err = cli("init", "acme/absent", "-o", tmp_path / "absent.yaml", *texts)
    assert code == 2
    line = one_line(err)
    assert "acme/absent" in line and "not in the local Hub cache" in line and "HF_HUB_OFFLINE" in line
    assert not (tmp_path / "absent.yaml").exists()


def test_demo_gguf_matches_the_demo_recipe(cli, smollm2_gguf, tmp_path, texts):
    """The demo's GGUF gives the demo's source, name, groups, gates and eval settings."""
    out = tmp_path / "smol.yaml"
    code, _, err = cli("init", smollm2_gguf, "-o", out, *texts)
    assert code == 0, err
    assert cli("validate", out)[0] == 0
    mine, demo = load_recipe(out).recipe, load_recipe(DEMO).recipe
    assert mine.name == demo.name
    assert (mine.source.kind, mine.source.package, mine.source.file, mine.source.license) == \
        (demo.source.kind, demo.source.package, demo.source.file, demo.source.license)
    theirs = {v.name: v for v in demo.variants}
    for v in mine.variants:
        # Same name as the demo's variant: same format, same group sizes, same gate.
        assert v.backend_params() == theirs[v.name].backend_params() or v.name == "modelopt-int4-awq", v.name
        assert v.gate == theirs[v.name].gate, v.name
    # ModelOpt's AWQ: the demo picks the same block (64: 128 cannot divide 576) and also speeds up the search.
    assert mine.variants[[v.name for v in mine.variants].index("modelopt-int4-awq")].awq_block_size == 64
    assert (mine.eval.tokens, mine.eval.seq_len, mine.eval.gate) == (demo.eval.tokens, demo.eval.seq_len, demo.eval.gate)
    assert {k: getattr(mine.calibration, k) for k in CALIBRATION} == {k: getattr(demo.calibration, k) for k in CALIBRATION}
    assert (EVAL, EVAL_GATE) == ({"tokens": demo.eval.tokens, "seq_len": demo.eval.seq_len},
                                 demo.eval.gate.model_dump(exclude_none=True))
    assert [t.gpu for t in mine.targets] == [t.gpu for t in demo.targets]
    # 576-wide rows: K-quants fall back on every tensor but the 30 ffn_down (1536 = 6 x 256).
    assert "181 of 211 tensors have rows of 576 values, not multiples of 256" in out.read_text()


def test_gguf_shapes_match_transformers(smollm2_gguf):
    """What the GGUF header gives is what transformers' import of the file builds."""
    from transformers import AutoConfig

    from pipeline.backends.shapes import linear_input_widths

    shapes, meta = shapes_from_gguf(smollm2_gguf)
    config = AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    widths = linear_input_widths(config, ("lm_head",))
    assert sorted(w for _n, w in shapes.linear_widths) == sorted(w for _n, w in widths)
    assert (shapes.hidden, shapes.layers, shapes.heads, shapes.kv_heads) == (576, 30, 9, 3)
    assert meta["general.license"] == "apache-2.0"


def test_existing_output_needs_force(cli, tiny_model, tmp_path, texts):
    out = tmp_path / "r.yaml"
    out.write_text("keep me\n")
    code, _, err = cli("init", tiny_model, "-o", out, *texts)
    assert code == 2
    assert "exists" in one_line(err) and "--force" in one_line(err)
    assert out.read_text() == "keep me\n"
    code, _, err = cli("init", tiny_model, "-o", out, "--force", *texts)
    assert code == 0, err
    assert load_recipe(out).recipe.name == tiny_model.name


@pytest.mark.parametrize("args, expect", [
    (["--gpu", "H1000"], "--gpu: unknown GPU 'H1000' (choose from V100, T4"),
    (["--engines", "vllm,tensorrt"], "--engines: unknown engine 'tensorrt' (choose from vllm, trtllm, llamacpp)"),
    (["--engines", "trtllm", "--gpu", "T4"], "no standard variant of trtllm fits this model on T4"),
    (["--name", "Bad Name"], "--name: invalid recipe name 'Bad Name'"),
    (["--eval-text", "/nonexistent/test.txt"], "--eval-text: text file not found: /nonexistent/test.txt"),
])
def test_bad_options_are_one_line(cli, tiny_model, tmp_path, args, expect, wikitext):
    out = tmp_path / "r.yaml"
    code, _, err = cli("init", tiny_model, "-o", out, "--calibration-text", wikitext / "valid.txt",
                       *(["--eval-text", str(wikitext / "test.txt")] if "--eval-text" not in args else []), *args)
    assert code == 2
    assert expect in one_line(err)
    assert not out.exists()


@pytest.mark.parametrize("model, expect", [
    ("./no/such/folder", "no such folder or file, and not a Hub id"),
    ("config", "no such folder or file, and not a Hub id"),
])
def test_bad_model_is_one_line(cli, tmp_path, model, expect, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("init", model)
    assert code == 2 and expect in one_line(err)


def test_folder_without_config_and_non_gguf_file(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = cli("init", tmp_path / "empty", "-o", tmp_path / "r.yaml")
    assert code == 2 and "no config.json" in one_line(err)
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = cli("init", tmp_path / "notes.txt", "-o", tmp_path / "r.yaml")
    assert code == 2 and "not a GGUF file" in one_line(err)


def test_init_imports_no_torch(tiny_model, tmp_path, wikitext):
    code = (
        "import sys\n"
        "from pipeline.cli.main import main\n"
        "try:\n"
        f"    main(['init', {str(tiny_model)!r}, '-o', {str(tmp_path / 'r.yaml')!r}, '--eval-text', "
        f"{str(wikitext / 'test.txt')!r}, '--calibration-text', {str(wikitext / 'valid.txt')!r}])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert (tmp_path / "r.yaml").is_file()
