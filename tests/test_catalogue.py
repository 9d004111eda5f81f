"""Backends are catalogued leaves: the recipe's variant union is the catalogue's, the
distributions list is derived from it, and one module plus one catalogue line (the test-only
round-to-nearest backend) runs end to end: plan, quantize, evaluate, gate, publish, verify."""

from __future__ import annotations

import json
import subprocess
import sys
import typing

import pytest

from pipeline import catalogue
from pipeline.backends import Quantizer, distributions, get_backend
from pipeline.backends.base import Backend
from pipeline.errors import RecipeError
from pipeline.recipe import Recipe, load_recipe
from pipeline.recipe.variants import VariantBase, variant_classes
from tests.conftest import REPO

RTN = "tests.backends.rtn:RTNBackend"


@pytest.fixture
def rtn_catalogued(monkeypatch):
    """The test-only backend's one catalogue line."""
    monkeypatch.setitem(catalogue.BACKENDS, "rtn", RTN)


def _literal(model) -> tuple:
    return typing.get_args(model.model_fields["backend"].annotation)


def test_the_union_is_the_catalogues():
    classes = variant_classes()
    assert [_literal(c) for c in classes] == [(name,) for name in catalogue.BACKENDS]
    for name, cls in zip(catalogue.BACKENDS, classes):
        backend = catalogue.backend_class(name)
        assert issubclass(backend, Backend) and backend.name == name and backend.variant is cls
        assert issubclass(cls, VariantBase)
    items = Recipe.model_json_schema()["properties"]["variants"]["items"]
    assert items["discriminator"]["propertyName"] == "backend"
    assert set(items["discriminator"]["mapping"]) == set(catalogue.BACKENDS)
    assert len(items["oneOf"]) == len(catalogue.BACKENDS)


def test_distributions_are_every_backends_once():
    pairs = distributions()
    assert len(pairs) == len(set(pairs))
    for name in catalogue.BACKENDS:
        assert set(catalogue.backend_class(name).distributions) <= set(pairs)
    assert ("llama_cpp", "llama-cpp-python") in pairs and ("modelopt", "nvidia-modelopt") in pairs


def test_only_standard_chain_backends_quantize():
    assert isinstance(get_backend("llmcompressor"), Quantizer) and isinstance(get_backend("modelopt"), Quantizer)
    llamacpp = get_backend("llamacpp")
    assert not isinstance(llamacpp, Quantizer) and not hasattr(llamacpp, "quantize")

    class NoQuantize(Quantizer):
        name, variant, distributions, extra = "x", VariantBase, (), "x"

        def describe(self, variant):
            raise AssertionError

        def load_for_eval(self, path, device):
            raise AssertionError

    with pytest.raises(TypeError, match="quantize"):
        NoQuantize()


def test_validate_and_schema_import_no_torch(recipe_factory):
    recipe = recipe_factory()
    for argv in (["validate", str(recipe)], ["schema"]):
        probe = ("import sys; from pipeline.cli.main import main\n"
                 f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                 "print([m for m in ('torch', 'transformers', 'numpy') if m in sys.modules])")
        out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", (argv, out.stderr[-2000:])


def _rtn_recipe(recipe_factory):
    path = recipe_factory()
    text = path.read_text().replace("backend: llmcompressor\n    scheme: FP8_DYNAMIC", "backend: rtn")
    text = text.replace("name: fp8", "name: int8")
    path.write_text(text)
    return path


def test_a_catalogue_line_adds_a_backend_to_recipes(recipe_factory, monkeypatch):
    path = _rtn_recipe(recipe_factory)
    with pytest.raises(RecipeError, match="'rtn'"):
        load_recipe(path)
    monkeypatch.setitem(catalogue.BACKENDS, "rtn", RTN)
    [variant] = load_recipe(path).recipe.variants
    assert type(variant).__name__ == "RTNVariant" and variant.bits == 8
    mapping = Recipe.model_json_schema()["properties"]["variants"]["items"]["discriminator"]["mapping"]
    assert "rtn" in mapping
    monkeypatch.delitem(catalogue.BACKENDS, "rtn")
    with pytest.raises(RecipeError, match="'rtn'"):
        load_recipe(path)


def test_test_only_backend_runs_end_to_end(rtn_catalogued, recipe_factory, cli, dirs):
    import torch
    from safetensors.torch import load_file

    from tests.backends.rtn import TARGETS

    code, out, err = cli("run", _rtn_recipe(recipe_factory))
    assert code == 0, err
    assert "int8" in out and "pass" in out
    [version] = sorted(p.parent for p in dirs["storage"].rglob("manifest.json"))
    assert version.parent.name == "int8"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["gate"]["passed"] is True
    assert manifest["format"]["format"] == "safetensors" and manifest["format"]["engines"] == []
    assert not manifest.get("serving_profiles") and not manifest.get("serve")
    assert set(manifest["metrics"]) >= {"ppl", "mean_kld", "top1"} and 0 < manifest["metrics"]["mean_kld"] < 1.0
    # The published weights are the quantizer's: INT8 multiples of a power-of-two scale per row.
    weights = load_file(str(version / "model.safetensors"))
    quantized = [name for name in weights if name.rsplit(".", 2)[-2] in TARGETS]
    assert len(quantized) == 14
    for name in quantized:
        w = weights[name].float()
        scale = torch.exp2(torch.ceil(torch.log2(w.abs().amax(dim=1, keepdim=True) / 127)))
        q = w / scale
        assert torch.equal(q, q.round()) and q.abs().max() <= 127
    code, out, _ = cli("verify", version)
    assert code == 0 and "ok" in out
