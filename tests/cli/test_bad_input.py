"""Bad input that used to escape as a traceback (exit 1), or to be misreported: each case is one
clear line on stderr, the family's exit code, nothing half-written (issue #15 items 4 and 10),
and reports that match the store after a partial failure (item 8)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from tests.conftest import one_line


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "objects").glob("*/*")) if (cache / "objects").exists() else []


def _published(storage: Path) -> list[Path]:
    return sorted(p.parent for p in storage.rglob("manifest.json"))


def _model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def _local(path: Path) -> str:
    return f"source:\n  kind: local\n  path: {path}\n"


def _rewrite_header(path: Path, edit) -> None:
    """Replace a safetensors file's JSON header by ``edit(header)``, keeping its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + n]))
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _assert_refused(cli, dirs, *args, code=2, says: str) -> str:
    got, _, err = cli(*args)
    line = one_line(err)
    assert got == code, err
    assert line.startswith("error: ") or line.startswith("invalid: "), err
    assert "Traceback" not in err and says in line, line
    assert _entries(dirs["cache"]) == [] and _published(dirs["storage"]) == []
    return line


@pytest.mark.parametrize("text, says", [
    ("x: &a [*a]\n", "recursive YAML alias"),
    ("name: tiny\nvariants: &v [*v]\n", "recursive YAML alias"),
    ("? [a, b]\n: 1\n", "a key must be a plain name"),
    ("name: !!python/object:os.system x\n", "malformed YAML"),
    ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"b{i}: &b{i} [{', '.join([f'*{p}'] * 10)}]\n" for i, p in enumerate(["a"] + [f"b{j}" for j in range(9)])),
     "more than 100000 nodes"),
], ids=["recursive-alias", "recursive-alias-in-variants", "complex-key", "python-tag", "deep-nesting", "alias-bomb"])
def test_hostile_yaml_is_one_line_from_validate_and_run(cli, dirs, tmp_path, text, says):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    _assert_refused(cli, dirs, "validate", recipe, says=says)
    _assert_refused(cli, dirs, "run", recipe, says=says)


def test_invalid_regex_in_ignore_is_refused_when_the_recipe_is_read(cli, dirs, recipe_factory):
    recipe = recipe_factory(variant_extra='    ignore: ["re:model.layers.[0-"]\n')
    line = _assert_refused(cli, dirs, "validate", recipe, says="invalid regular expression 're:model.layers.[0-'")
    assert "variants.0.ignore" in line


def test_invalid_regex_in_gguf_tensor_types_is_refused(cli, dirs, recipe_factory):
    recipe = recipe_factory(extra="  - name: q4\n    backend: llamacpp\n    type: Q4_K_M\n"
                                  "    tensor_types: {'blk.(0': q8_0}\n")
    _assert_refused(cli, dirs, "validate", recipe, says="invalid regular expression")


def test_source_path_in_a_symlink_loop(cli, dirs, recipe_factory, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    _assert_refused(cli, dirs, "run", recipe_factory(source=_local(tmp_path / "a")), says="Symlink loop")


@pytest.mark.parametrize("case, says", [
    ("header-is-a-list", "the header is not a JSON object"),
    ("no-data-offsets", "data_offsets None is not [begin, end]"),
    ("shape-lies", "needs"),
    ("dtype-lies", "needs"),
    ("unknown-dtype", "unknown dtype 'F12'"),
    ("overlap", "overlap"),
    ("metadata-not-strings", "__metadata__"),
])
def test_safetensors_header_that_lies_is_refused_before_anything_is_cached(cli, dirs, recipe_factory, tmp_path,
                                                                            tiny_model, case, says):
    model = _model_copy(tiny_model, tmp_path)

    def edit(header: dict):
        name = _first_tensor(header)
        if case == "header-is-a-list":
            return [header]
        if case == "no-data-offsets":
            del header[name]["data_offsets"]
        elif case == "shape-lies":
            header[name]["shape"] = [d * 2 for d in header[name]["shape"]]
        elif case == "dtype-lies":
            header[name]["dtype"] = "F32" if header[name]["dtype"] != "F32" else "F16"
        elif case == "unknown-dtype":
            header[name]["dtype"] = "F12"
        elif case == "overlap":  # two tensors of one dtype and shape: the later one points at the earlier's bytes
            norm = "model.layers.0.input_layernorm.weight"
            same = sorted((k for k in header if k.endswith("_layernorm.weight")), key=lambda k: header[k]["data_offsets"])
            assert norm in same and len(same) >= 2  # the tiny Llama's norms: BF16 [64] each
            header[same[1]]["data_offsets"] = header[same[0]]["data_offsets"]
        elif case == "metadata-not-strings":
            header["__metadata__"] = {"format": 1}
        return header

    _rewrite_header(model / "model.safetensors", edit)
    _assert_refused(cli, dirs, "run", recipe_factory(source=_local(model)), says=says)


def test_config_json_that_is_a_list(cli, dirs, recipe_factory, tmp_path, tiny_model):
    model = _model_copy(tiny_model, tmp_path)
    (model / "config.json").write_text("[]")
    _assert_refused(cli, dirs, "plan", recipe_factory(source=_local(model)), says="config.json")


def test_missing_tokenizer_names_the_missing_file(cli, dirs, recipe_factory, tmp_path, tiny_model):
    model = _model_copy(tiny_model, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    line = _assert_refused(cli, dirs, "run", recipe_factory(source=_local(model)), says="no tokenizer")
    assert "tokenizer.json" in line and "sentencepiece" not in line


@pytest.mark.parametrize("text, says", [
    ("[]", "malformed: a JSON object expected, found a list"),
    ("null", "malformed: a JSON object expected, found null"),
    ('{"source": "x"}', "'source' is a string"),
    ("{", "not valid JSON"),
])
def test_malformed_lock_is_named_malformed_and_still_reported(cli, dirs, recipe_factory, tmp_path, text, says):
    recipe = recipe_factory()
    recipe.with_name("recipe.lock.json").write_text(text)
    line = _assert_refused(cli, dirs, "run", recipe, "--locked", "--report-dir", tmp_path / "r", says=says)
    assert "no lock file" not in line
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["exit_code"] == 2 and says in summary["error"]


def test_lock_file_that_is_a_folder(cli, dirs, recipe_factory):
    recipe = recipe_factory()
    recipe.with_name("recipe.lock.json").mkdir()
    _assert_refused(cli, dirs, "run", recipe, "--locked", says="cannot read lock file")


def test_device_cuda_without_cuda_is_refused_before_the_fetch(cli, dirs, recipe_factory):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _assert_refused(cli, dirs, "run", recipe_factory(), "--device", "cuda", says="--device cuda but")
    assert "--device cpu" in line


def test_unknown_device_is_refused(cli, dirs, recipe_factory):
    _assert_refused(cli, dirs, "run", recipe_factory(), "--device", "tpu", says="unknown device 'tpu'")


def test_eval_corpus_with_fewer_tokens_than_asked_is_refused_at_plan_time(cli, dirs, recipe_factory, tmp_path,
                                                                          tiny_model, wikitext):
    """1,024 <= N < 1,100 tokens: enough for the 128-token windows 1,100 rounds down to, which
    used to be gated on silently; now plan refuses, saying how many tokens there are."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = (wikitext / "test.txt").read_text(encoding="utf-8")[:40_000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    short = tmp_path / "short.txt"
    short.write_text(tokenizer.decode(ids[:1060]), encoding="utf-8")
    n = len(tokenizer(short.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    assert 1024 <= n < 1100
    recipe = recipe_factory(tokens=1100)
    recipe.write_text(recipe.read_text().replace(str(wikitext / "test.txt"), str(short)))
    _assert_refused(cli, dirs, "plan", recipe, says=f"eval corpus too short: it has {n} tokens, eval.tokens asks 1100")
    _assert_refused(cli, dirs, "run", recipe, says=f"eval corpus too short: it has {n} tokens, eval.tokens asks 1100")


def test_eval_corpus_too_short_is_still_refused_at_baseline(tiny_model, wikitext):
    """Sources whose tokenizer plan cannot see without a download (Hub, GGUF) are counted when
    the baseline tokenizes: the same line."""
    from transformers import AutoTokenizer

    from pipeline.errors import DataError
    from pipeline.quality.corpus import token_windows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = (wikitext / "test.txt").read_text(encoding="utf-8")[:3000]
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(DataError, match=f"it has {n} tokens, eval.tokens asks {n + 1}"):
        token_windows(text, tokenizer, tokens=n + 1, seq_len=8, where="eval.corpus")
    assert token_windows(text, tokenizer, tokens=n, seq_len=8, where="eval.corpus").shape == (n // 8, 8)


def test_debug_switch_adds_the_traceback_but_keeps_the_exit_code(cli, dirs, tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("x: &a [*a]\n")
    plain = cli("run", recipe)
    monkeypatch.setenv("MODELBUILD_DEBUG", "1")
    code, _, err = cli("run", recipe)
    assert plain[0] == code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1] == plain[2].strip()


def test_a_bug_is_one_line_with_exit_1_not_a_traceback(cli, recipe_factory, monkeypatch):
    import pipeline.run.orchestrate

    def broken(*a, **k):
        raise TypeError("unexpected thing")

    monkeypatch.setattr(pipeline.run.orchestrate, "prepare", broken)
    code, _, err = cli("plan", recipe_factory())
    assert code == 1
    line = one_line(err)
    assert line.startswith("error: internal error: TypeError: unexpected thing") and "MODELBUILD_DEBUG=1" in line


def test_reports_match_the_store_when_a_later_variant_fails(cli, dirs, recipe_factory, tmp_path, monkeypatch):
    """The first variant passes and is published; the second's quantize fails (exit 4). The
    reports say the first is published, with its metrics and the baseline, and only the second
    errored."""
    from junitparser import Error, JUnitXml

    from pipeline.backends.llmcompressor import LLMCompressorBackend

    real = LLMCompressorBackend.quantize

    def quantize(self, variant, *a, **k):
        if variant.name == "w8a16":
            raise RuntimeError("out of memory (simulated)")
        return real(self, variant, *a, **k)

    monkeypatch.setattr(LLMCompressorBackend, "quantize", quantize)
    recipe = recipe_factory(extra="  - name: w8a16\n    backend: llmcompressor\n    scheme: W8A16\n    group_size: 32\n")
    code, _, err = cli("run", recipe, "--report-dir", tmp_path / "r")
    assert code == 4, err
    [version] = _published(dirs["storage"])
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["exit_code"] == 4 and "out of memory" in summary["error"]
    assert summary["baseline"]["ppl"] > 0
    first, second = summary["variants"]
    assert first["status"] == "passed" and first["publish"]["path"] == str(version)
    assert first["metrics"]["mean_kld"] >= 0
    assert second["status"] == "error" and "metrics" not in second
    [suite] = list(JUnitXml.fromfile(str(tmp_path / "r" / "junit.xml")))
    assert suite.tests == 2 and suite.errors == 1 and suite.failures == 0
    cases = {c.name: c for c in suite}
    assert not cases["fp8"].result and isinstance(cases["w8a16"].result[0], Error)
    markdown = (tmp_path / "r" / "summary.md").read_text()
    assert "| fp8 | ✅ passed |" in markdown and "| w8a16 | ⚠️ error |" in markdown
    # Under the debug switch the same failure exits with the same code.
    monkeypatch.setenv("MODELBUILD_DEBUG", "1")
    assert cli("run", recipe, "--report-dir", tmp_path / "r2")[0] == 4


def test_storage_root_in_a_symlink_loop(cli, dirs, recipe_factory, tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    _assert_refused(cli, dirs, "run", recipe_factory(), "--storage", tmp_path / "a", says="cannot resolve the storage root")


def test_unwritable_report_folder_keeps_the_runs_own_error(cli, dirs, recipe_factory, tmp_path):
    """The reports cannot be written (the folder is a file): the run's own error stays the error
    line and exit code; the report failure is one warning beside it, never a traceback."""
    blocker = tmp_path / "reports-file"
    blocker.write_text("x")
    code, _, err = cli("run", recipe_factory(), "--locked", "--report-dir", blocker)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 2, err
    assert lines[-1].startswith("error: ") and "no lock file" in lines[-1]
    assert "cannot write the run's reports" in lines[0]
