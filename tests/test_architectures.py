"""The architecture matrix: every family of ``tests/architectures.py`` through every stage.

Per family (one module-scoped run each): a tiny random model is built; each format of the matrix
is planned alone (``modelbuild plan``: a refusal is one line, exit 2); the accepted ones are then
run in one recipe (fetch from the local folder, baseline, quantization, evaluation, gates, the
GGUF conversion and its tokenizer fidelity check, publishing with serving profiles for an H100
target). The outcomes must be ``EXPECTED``'s, from which docs/compatibility.md is generated.
"""

from __future__ import annotations

import contextlib
import io
import json
import textwrap
from pathlib import Path

import pytest

from tests.architectures import EXPECTED, FAMILIES, FORMATS, NO_GGUF, PASS, build, render_table
from tests.conftest import REPO, WIKITEXT


def _recipe(folder: Path, family: str, model: Path, formats: list[str]) -> Path:
    variants = "".join(f"- name: {f}\n" + textwrap.indent(FORMATS[f].variant, "  ") + "\n" for f in formats)
    kind = "gguf" if model.suffix == ".gguf" else "local"
    text = (
        f"name: arch-{family}\nsource:\n  kind: {kind}\n  path: {model}\n  license: apache-2.0\n"
        f"calibration:\n  path: {WIKITEXT / 'valid.txt'}\n  samples: 4\n  seq_len: 64\n"
        f"eval:\n  corpus: {WIKITEXT / 'test.txt'}\n  tokens: 256\n  seq_len: 128\n  gate:\n    max_kld: 10.0\n"
        "targets:\n  - {gpu: H100, tp: 1}\n"
        "gguf:\n  metadata:\n    name: Tiny\n    basename: Tiny\n    size_label: 1M\n"
        "  speed:\n    prompt_tokens: 16\n    gen_tokens: 4\n    repetitions: 1\n"
        "variants:\n" + textwrap.indent(variants, "  ")
    )
    path = folder / f"{'-'.join(formats) if len(formats) == 1 else 'all'}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _modelbuild(*argv: str) -> tuple[int, str]:
    """``modelbuild ARGV`` in process (the real entry point); (exit code, stderr)."""
    from pipeline.cli.main import main

    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, err.getvalue()


@pytest.fixture(scope="session")
def models(tmp_path_factory, smollm2_gguf) -> Path:
    """Where the families' tiny models are built (the trained SentencePiece model shared)."""
    return tmp_path_factory.mktemp("arch-models")


@pytest.fixture(scope="module", params=list(FAMILIES))
def matrix(request, models, smollm2_gguf, tmp_path_factory) -> dict:
    """One family through the matrix: its model, each format's plan outcome, the run's store."""
    family = request.param
    model = build(family, models / family, cache=models, gguf=smollm2_gguf)
    root = tmp_path_factory.mktemp(f"arch-{family}")
    dirs = ["--cache-dir", str(root / "cache"), "--storage", str(root / "store")]
    outcomes: dict[str, str] = {}
    for fmt in (f for f, spec in FORMATS.items() if not spec.from_gguf):
        code, err = _modelbuild("plan", str(_recipe(root, family, model, [fmt])), *dirs)
        lines = [line for line in err.splitlines() if line.strip()]
        if code == 0:
            outcomes[fmt] = PASS
        else:
            assert code == 2 and len(lines) == 1, (family, fmt, code, err[-3000:])
            outcomes[fmt] = lines[0]  # error: <recipe>:<line>: variants.0.<field>: <message> (<fix>)
    accepted = [f for f, o in outcomes.items() if o == PASS]
    code, err = _modelbuild("run", str(_recipe(root, family, model, accepted)), *dirs)
    assert code == 0, (family, [line for line in err.splitlines() if "error" in line.lower()][-3:])
    published = {p.parent.parent.name: p.parent for p in (root / "store").rglob("manifest.json")}
    for fmt in (f for f, spec in FORMATS.items() if spec.from_gguf):
        if "gguf-q8" not in published:
            outcomes[fmt] = NO_GGUF
            continue
        # The family's own GGUF as the source: fetch (import, tokenizer rebuilt and checked against
        # llama.cpp's), baseline and the variant; a refusal is one line at plan or fetch, exit 2.
        gguf = next(published["gguf-q8"].glob("*.gguf"))
        code, err = _modelbuild("run", str(_recipe(root, f"{family}-from-gguf", gguf, [fmt])), *dirs)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code in (0, 2) and len(errors) == (code != 0), (family, fmt, code, errors or err[-2000:])
        outcomes[fmt] = PASS if code == 0 else errors[0]
    published = {p.parent.parent.name: p.parent for p in (root / "store").rglob("manifest.json")
                 if p.parent.parent.parent.name == f"arch-{family}"}
    from_gguf = {p.parent.parent.name: p.parent for p in (root / "store").rglob("manifest.json")
                 if p.parent.parent.parent.name == f"arch-{family}-from-gguf"}
    return {"family": family, "model": model, "outcomes": outcomes, "published": published, "from_gguf": from_gguf}


def test_outcomes_are_the_expected(matrix):
    family = matrix["family"]
    for fmt, outcome in matrix["outcomes"].items():
        expected = EXPECTED[family][fmt]
        if expected == PASS:
            assert outcome == PASS, (family, fmt, outcome)
        elif expected == NO_GGUF:
            assert outcome == NO_GGUF, (family, fmt, outcome)
        else:
            assert outcome.startswith("error: ") and (FORMATS[fmt].from_gguf or ": variants.0." in outcome), outcome
            assert f": {expected}" in outcome, (family, fmt, outcome)
    passed = {f for f, o in matrix["outcomes"].items() if o == PASS}
    assert set(matrix["published"]) == {f for f in passed if not FORMATS[f].from_gguf}
    assert set(matrix["from_gguf"]) == {f for f in passed if FORMATS[f].from_gguf}


def test_published_variants_are_gated_and_profiled(matrix):
    for fmt, folder in {**matrix["published"], **matrix["from_gguf"]}.items():
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["gate"]["passed"] is True, (matrix["family"], fmt)
        profiled = {p["engine"] for p in manifest.get("serving_profiles") or []}
        assert profiled == set(FORMATS[fmt].engines), (matrix["family"], fmt, profiled)
        if fmt.startswith("gguf"):
            fidelity = manifest["fidelity"]
            assert fidelity["tokenizer"]["mismatches"] == 0 and fidelity["tokenizer"]["tokens"] > 256


def _safetensors_names(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    names: dict[str, str] = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                names[name] = str(st.get_slice(name).get_dtype())
    return names


# The mixture-of-experts families' own matrix runs (the module's instances, shared with the tests above).
MOE = [name for name, family in FAMILIES.items() if family.moe]


@pytest.mark.parametrize("matrix", MOE, indirect=True)
def test_moe_gguf_holds_experts_and_router(matrix):
    from pipeline.toolchains.gguf_reader import gguf_file, tensor_types

    types = tensor_types(gguf_file(matrix["published"]["gguf-q8"]))
    for kind in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        assert sum(f".{kind}." in t for t in types) == 2, (kind, sorted(types))  # one per layer


@pytest.mark.parametrize("matrix", MOE, indirect=True)
@pytest.mark.parametrize("backend", ["llmcompressor", "modelopt"])
def test_moe_quantization_keeps_routers_out_and_quantizes_experts(matrix, backend, tmp_path):
    """What the libraries write for a mixture-of-experts model (their evaluation here is refused
    at plan time, so the quantizer is called directly): routers unquantized, every expert quantized."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from pipeline.backends import get_backend

    quantizer = get_backend(backend)
    fields = {"scheme": "FP8_DYNAMIC"} if backend == "llmcompressor" else {"qformat": "fp8"}
    variant = quantizer.variant(name="q", backend=backend, **fields)
    ids = AutoTokenizer.from_pretrained(matrix["model"])((WIKITEXT / "valid.txt").read_text()[:2000])["input_ids"]
    calibration = [ids[i : i + 32] for i in range(0, 128, 32)] if variant.needs_calibration() else None
    quantizer.quantize(variant, matrix["model"], tmp_path, calibration=calibration, device="cpu")
    names = set()
    for f in tmp_path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names |= set(st.keys())
    routers = sorted(n.removesuffix(".weight") for n in names if n.endswith(".gate.weight") and ".experts." not in n)
    experts = sorted(n.removesuffix(".weight") for n in names if ".experts." in n and n.endswith(".weight"))
    assert len(routers) == 2 and len(experts) == 2 * 4 * 3, (routers, experts[:6])
    scaled = {n.removesuffix(".weight_scale") for n in names if n.endswith(".weight_scale")}
    assert not scaled & set(routers), sorted(scaled & set(routers))
    assert set(experts) <= scaled, sorted(set(experts) - scaled)[:6]


def test_the_build_is_deterministic(tmp_path, smollm2_gguf):
    from tests.architectures import digest

    a = build("llama", tmp_path / "a", cache=tmp_path / "spm-a", gguf=smollm2_gguf)
    b = build("llama", tmp_path / "b", cache=tmp_path / "spm-b", gguf=smollm2_gguf)
    assert digest(a) == digest(b)


def test_compatibility_table_is_the_matrix():
    committed = (REPO / "docs" / "compatibility.md").read_text(encoding="utf-8")
    assert committed == render_table(), "docs/compatibility.md is stale: python -m tests.architectures > docs/compatibility.md"
