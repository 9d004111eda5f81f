"""Recipe parsing: strict schema, one targeted error line with file, field and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import RecipeError
from pipeline.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    loaded = load_recipe(path)
    assert loaded.recipe.variants
    assert len(loaded.digest) == 64


def _error(tmp_path, text: str) -> RecipeError:
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return info.value


def test_malformed_yaml_names_file_and_line(tmp_path, recipe_factory):
    err = _error(tmp_path, "name: x\nsource: {kind: local\neval: 3\n")
    assert err.line == 3
    assert "malformed YAML" in err.render() and "r.yaml:3" in err.render()


def test_unknown_key_names_path_and_line(recipe_factory):
    path = recipe_factory(variant_extra="    bits: 4\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    err = info.value
    assert err.field == "variants.0.bits"
    lines = path.read_text().splitlines()
    assert lines[err.line - 1].strip().startswith("bits")
    assert "unknown key" in err.render()


def test_unknown_backend(recipe_factory):
    path = recipe_factory()
    path.write_text(path.read_text().replace("backend: llmcompressor", "backend: autogptq"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "autogptq" in info.value.render() and "llmcompressor" in info.value.render()
    assert info.value.field == "variants.0.backend"


def test_unknown_scheme(recipe_factory):
    path = recipe_factory()
    path.write_text(path.read_text().replace("FP8_DYNAMIC", "FP9"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.field == "variants.0.scheme" and "FP9" in info.value.render()


@pytest.mark.parametrize(
    "gate, field",
    [("min_top1: 1.5", "eval.gate.min_top1"), ("max_ppl_ratio: 0.9", "eval.gate.max_ppl_ratio"),
     ("max_kld: -1", "eval.gate.max_kld")],
)
def test_gate_threshold_out_of_range(recipe_factory, gate, field):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_factory(gate=gate))
    assert info.value.field == field


@pytest.mark.parametrize("target, field, message", [
    ("{engine: vllm, gpu: cpu}", "report.targets.0", "only llamacpp does"),
    ("{engine: vllm, gpu: Z900}", "report.targets.0.gpu", "unknown GPU 'Z900'"),
    ("{engine: sglang, gpu: H100}", "report.targets.0.engine", "sglang"),
    ("{engine: llamacpp, gpu: cpu, max_gb: 0}", "report.targets.0.max_gb", "greater than 0"),
])
def test_bad_report_targets(recipe_factory, target, field, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_factory(extra=f"report:\n  targets:\n    - {target}\n"))
    assert info.value.field == field and message in info.value.render(), info.value.render()


def test_calibration_and_eval_same_file(tmp_path, tiny_model, wikitext):
    from tests.conftest import write_recipe

    path = write_recipe(tmp_path, tiny_model, wikitext)
    path.write_text(path.read_text().replace("valid.txt", "test.txt"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "same file" in info.value.render()


def test_duplicate_keys_and_variant_names(recipe_factory):
    path = recipe_factory(variant_extra="  - name: fp8\n    backend: llmcompressor\n    scheme: FP8_DYNAMIC\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "unique" in info.value.render()
    path.write_text(path.read_text() + "name: again\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "duplicate key 'name'" in info.value.render()


def test_relative_paths_resolve_against_recipe_folder(tmp_path, tiny_model, wikitext):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(
        f"name: x\nsource: {{kind: local, path: ../model}}\neval: {{corpus: {wikitext / 'test.txt'}}}\n"
        "variants: [{name: a, backend: llmcompressor, scheme: FP8_DYNAMIC}]\n"
    )
    recipe = load_recipe(path).recipe
    assert recipe.source.path == (tmp_path / "model").resolve()


def test_cli_validate_and_schema(cli, recipe_factory, tmp_path):
    good = recipe_factory()
    code, out, _ = cli("validate", good)
    assert code == 0 and "ok:" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [\n")
    code, _, err = cli("validate", good, bad)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "bad.yaml" in err
    code, out, _ = cli("schema")
    schema = json.loads(out)
    assert set(schema["properties"]) >= {"name", "source", "calibration", "eval", "variants", "publish"}


def test_cli_run_on_bad_recipe_is_one_line(cli, recipe_factory):
    path = recipe_factory(variant_extra="    sheme: x\n")
    code, _, err = cli("run", path)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "variants.0.sheme" in err


def test_schema_and_cli_import_no_torch():
    code = (
        "import sys, pipeline.recipe, pipeline.cli.main, pipeline.backends\n"
        "from pipeline.backends import get_backend\n"
        "get_backend('llmcompressor').describe\n"
        "bad = [m for m in ('torch', 'transformers', 'llmcompressor') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_cli_usage_errors_exit_2(cli):
    assert cli("run")[0] == 2
    assert cli("run", "x.yaml", "--bogus")[0] == 2
    code, _, err = cli("run", "does-not-exist.yaml")
    assert code == 2 and err.strip() == "error: does-not-exist.yaml: file not found (check the path)"
