"""Property-based fuzzing of everything a user hands modelbuild: recipes (YAML), lock files, and a
source folder's safetensors headers and config.json. Whatever the input, the CLI answers with
an exit code of its families (0, 2-6), at most two lines on stderr, no traceback and nothing
half-written.

Also published store files (index.json, manifests, channel pointers) read by list, show, verify
and reindex.

The CLI runs in-process through ``pipeline.cli.main.main`` (the console script's entry point, its
error boundary included: anything that escapes it as an exception fails the example as exit 1),
far faster than a subprocess per example. Hypothesis is derandomized (the same examples on every
run, no example database) and each test has a fixed budget: 410 examples in all, about 100 s on
two shared cores (37 s of CPU), one tiny-model build for the store included.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from tests.conftest import write_recipe

EXIT_CODES = {0, 2, 3, 4, 5, 6}
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def invoke(*args) -> tuple[int, str, str]:
    """``modelbuild ARGS`` in-process: (exit code, stdout, stderr)."""
    from pipeline.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def assert_clean(code: int, err: str, what: str) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code in EXIT_CODES, f"{what}: exit {code}\n{err}"
    assert "Traceback" not in err and "internal error" not in err, f"{what}:\n{err}"
    assert len(lines) <= 2, f"{what}: {len(lines)} lines on stderr:\n{err}"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, wikitext):
    """A valid recipe over a private copy of the tiny model; one cache for every example (so
    plan-time checks of an unchanged source are remembered, as in real use)."""
    root = tmp_path_factory.mktemp("fuzz")
    model = Path(shutil.copytree(tiny_model, root / "model"))
    recipe = write_recipe(root, model, wikitext)
    # A fuzzed Hub source must answer from the (empty) local cache, never wait on a network.
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(root / "hub"))
    yield {"root": root, "model": model, "recipe": recipe, "text": recipe.read_text(),
           "cache": root / "cache", "storage": root / "store", "wikitext": wikitext}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _stage_entries(cache: Path) -> list[Path]:
    return sorted((cache / "objects").glob("*/*")) if (cache / "objects").exists() else []


# --- values ----------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["FP8_DYNAMIC", "W8A16", "llmcompressor", "llamacpp", "modelopt", "local", "hub", "gguf",
                     "re:[", "re:.*", "lm_head", "H100", "cpu", "main", "a/b", "", " ", "~", "/", "../x"]),
)
json_values = st.recursive(
    scalars.filter(lambda v: not (isinstance(v, float) and v != v)),  # NaN is not JSON
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
yaml_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


def _paths(tree, at=()):
    """Every path into a nested dict/list structure (the root excluded)."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return
    for key, value in items:
        yield at + (key,)
        yield from _paths(value, at + (key,))


def _set(tree, path, value=None, delete=False):
    for key in path[:-1]:
        tree = tree[key]
    if delete:
        del tree[path[-1]]
    else:
        tree[path[-1]] = value


@st.composite
def mutated_trees(draw, base):
    """``base`` (a JSON-like tree) with a few subtrees replaced, deleted or added."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(tree))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        try:
            if action == "delete":
                _set(tree, path, delete=True)
            elif action == "add":
                parent = tree
                for key in path[:-1]:
                    parent = parent[key]
                if isinstance(parent, dict):
                    parent[draw(st.text(min_size=1, max_size=8))] = draw(yaml_values)
                else:
                    parent.append(draw(yaml_values))
            else:
                _set(tree, path, draw(yaml_values))
        except (KeyError, IndexError, TypeError):
            pass
    return tree


# Fragments that stress a YAML parser and a schema: aliases, complex keys, tags, flow syntax,
# documents, control characters, number spellings.
YAML_TOKENS = ["&a ", "*a", "x: &a [*a]\n", "? ", "? [a, b]\n: 1\n", "[", "]", "{", "}", ": ", "- ", "!!binary ",
               "!!python/object:os.system ", "!!set ", "---\n", "...\n", "\t", "\x00", "\x85", "'", '"', "#", "<<: *a\n",
               "%YAML 1.1\n", "\ufeff", "|\n", ">-\n", "~", "null", "1e999", "-1", "0x10", ".inf", ".nan", "2001-13-45",
               "\\", "\u2028", "\n", "  ", "é", "\r"]


@st.composite
def mutated_text(draw, text: str):
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "duplicate-line", "drop-line"]))
        if op == "insert":
            text = text[:pos] + draw(st.sampled_from(YAML_TOKENS) | st.text(max_size=6)) + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 12)):]
        else:
            lines = text.splitlines(keepends=True)
            if lines:
                i = draw(st.integers(0, len(lines) - 1))
                lines[i:i + 1] = [lines[i]] * (2 if op == "duplicate-line" else 0)
                text = "".join(lines)
    return text


# --- recipes ---------------------------------------------------------------------------------

# Variants and settings that pass (or nearly pass) the schema, so that plan's later checks (the
# backends' checks against the model's config, targets, corpora) see many of them too.
VARIANTS = [
    {"backend": "llmcompressor", "scheme": "FP8_DYNAMIC"},
    {"backend": "llmcompressor", "scheme": "W8A16", "group_size": 32},
    {"backend": "llmcompressor", "scheme": "W4A16", "group_size": 48},
    {"backend": "llmcompressor", "scheme": "W4A16", "algorithm": "gptq", "gptq": {"block_size": 64}},
    {"backend": "llmcompressor", "scheme": "W4A16", "algorithm": "awq", "awq": {"n_grid": 2, "duo_scaling": "both"}},
    {"backend": "llmcompressor", "scheme": "W8A8", "smoothquant": {"smoothing_strength": 0.5}},
    {"backend": "llmcompressor", "scheme": "NVFP4A16", "ignore": ["re:.*mlp.*", "lm_head"]},
    {"backend": "llmcompressor", "scheme": "FP8_DYNAMIC", "ignore": ["re:(unclosed"], "targets": ["Linear"]},
    {"backend": "llmcompressor", "scheme": "MXFP4A16", "entrypoint": "model_free"},
    {"backend": "llamacpp", "type": "Q4_K_M", "tensor_types": {"blk\\.0\\..*": "q8_0"}},
    {"backend": "llamacpp", "type": "IQ2_XS", "imatrix": False},
    {"backend": "llamacpp", "type": "F16", "output_type": "q8_0"},
    {"backend": "modelopt", "qformat": "fp8"},
    {"backend": "modelopt", "qformat": "int4_awq", "awq_block_size": 48},
    {"backend": "modelopt", "qformat": "nvfp4", "engines": [{"gpu": "H100", "tp": 3}]},
]
TARGETS = [[], [{"gpu": "T4"}], [{"gpu": "H100", "tp": 3}], [{"gpu": "B200", "tp": 2, "pp": 2}], [{"gpu": "X9"}]]


@st.composite
def plausible_recipes(draw, base):
    tree = copy.deepcopy(base)
    names = draw(st.lists(st.sampled_from(["a", "b", "c", "fp8", "A"]), min_size=1, max_size=3))
    tree["variants"] = [{"name": n, **draw(st.sampled_from(VARIANTS))} for n in names]
    tree["targets"] = draw(st.sampled_from(TARGETS))
    tree["eval"]["tokens"] = draw(st.sampled_from([16, 128, 1024, 5000, 10_000_000]))
    tree["eval"]["seq_len"] = draw(st.sampled_from([8, 128, 4096]))
    if draw(st.booleans()):
        tree["eval"]["top_k"] = draw(st.sampled_from([1, 32, 1_000_000]))
    if draw(st.booleans()):
        tree["publish"] = {"root": draw(st.sampled_from(["relative/store", "s3://bucket/p", "/dev/null/x", "~"]))}
    if draw(st.booleans()):
        tree["source"] = draw(st.sampled_from([
            {"kind": "gguf", "path": "absent.gguf"}, {"kind": "gguf", "package": "no_such_pkg", "file": "x.gguf"},
            {"kind": "hub", "repo": "acme/absent"}, {"kind": "local", "path": "."},
            {**base["source"], "trust_remote_code": True}]))
    return tree


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_any_recipe_is_validated_and_planned_cleanly(world, data):
    base = yaml.safe_load(world["text"])
    kind = data.draw(st.sampled_from(["plausible", "structural", "text"]), label="kind")
    if kind == "plausible":
        text = yaml.safe_dump(data.draw(plausible_recipes(base), label="tree"), sort_keys=False)
    elif kind == "structural":
        tree = data.draw(mutated_trees(base), label="tree")
        text = yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)
    else:
        text = data.draw(mutated_text(world["text"]), label="text")
    recipe = world["root"] / "fuzzed.yaml"
    recipe.write_text(text, encoding="utf-8", errors="surrogatepass")
    code, _, err = invoke("validate", recipe)
    assert_clean(code, err, "validate")
    assert code in (0, 2)
    event(f"validate exit {code}")
    if code == 0:
        code, _, err = invoke("plan", recipe, "--cache-dir", world["cache"], "--storage", world["storage"])
        assert_clean(code, err, "plan")
        assert code in (0, 2)
        event(f"plan exit {code}" + (": " + err.strip().splitlines()[-1][-90:] if code else ""))
    assert _stage_entries(world["cache"]) == []  # validate and plan never build


# --- lock files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(world) -> dict:
    code, _, err = invoke("lock", world["recipe"], "--cache-dir", world["cache"])
    assert code == 0, err
    path = world["recipe"].with_name("recipe.lock.json")
    return {"path": path, "lock": json.loads(path.read_text())}


COMPARED = ("recipe_sha256", "source", "data", "tools")


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_any_lock_file_is_refused_cleanly_and_still_reported(world, locked, data):
    from pipeline.run.lockfile import differences

    real = locked["lock"]
    kind = data.draw(st.sampled_from(["any-json", "mutated", "bytes"]), label="kind")
    if kind == "any-json":
        value = data.draw(json_values, label="lock")
        text = json.dumps(value)
    elif kind == "mutated":
        value = data.draw(mutated_trees({k: real[k] for k in COMPARED}), label="lock")
        value = {**real, **value} if data.draw(st.booleans(), label="keep-others") else value
        text = json.dumps(value)
    else:
        value = None
        text = data.draw(mutated_text(json.dumps(real, indent=2)), label="text")
    try:
        parsed = json.loads(text) if kind == "bytes" else value
        # What the run compares (a mutated timestamp or path outside those sections still matches).
        same = isinstance(parsed, dict) and not differences(parsed, real)
    except (ValueError, TypeError, AttributeError):
        same = False
    assume(not same)  # a lock that still matches would build the whole recipe
    locked["path"].write_text(text, encoding="utf-8", errors="surrogatepass")
    reports = world["root"] / "reports"
    shutil.rmtree(reports, ignore_errors=True)
    try:
        code, _, err = invoke("run", world["recipe"], "--locked", "--cache-dir", world["cache"], "--storage",
                              world["storage"], "--report-dir", reports)
    finally:
        locked["path"].write_text(json.dumps(real))
    assert_clean(code, err, "run --locked")
    assert code == 2, err
    event(err.split(":")[-1][:40] if "malformed" in err or "not valid JSON" in err else "mismatch")
    assert _stage_entries(world["cache"]) == [] and not world["storage"].exists()
    summary = json.loads((reports / "summary.json").read_text())  # whole, never half-written
    assert summary["exit_code"] == 2 and summary["error"] in err
    assert not list(reports.glob(".*.tmp"))


# --- a source folder's safetensors header and config.json -------------------------------------

DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F4", "F6_E2M3", "F8_E4M3", "I64", "C64", "F12", "", "f32"]


def _read_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@st.composite
def mutated_headers(draw, header: dict):
    header = copy.deepcopy(header)
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "metadata", "whole", "drop"]))
        if field == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(DTYPES) | json_values)
        elif field == "shape":
            header[name]["shape"] = draw(st.lists(st.integers(-2, 300), max_size=3) | json_values)
        elif field == "data_offsets":
            lo = draw(st.integers(-10, 200_000))
            header[name]["data_offsets"] = draw(st.just([lo, lo + draw(st.integers(-10, 70_000))]) | json_values)
        elif field == "entry":
            header[name] = draw(json_values)
        elif field == "metadata":
            header["__metadata__"] = draw(json_values)
        elif field == "drop":
            header.pop(name, None)
        else:
            return draw(json_values)
        if not isinstance(header, dict) or name not in header or not isinstance(header[name], dict):
            break
    return header


def _library_loads(path: Path) -> bool:
    """The oracle: the safetensors library opens the file and reads every tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:  # noqa: BLE001 - the library's refusals come in many types
        return False


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_any_safetensors_header_is_judged_like_the_library_and_planned_cleanly(world, tmp_path_factory, data):
    from pipeline.errors import SourceError
    from pipeline.sources.checkpoint import check_safetensors

    model = tmp_path_factory.mktemp("src") / "model"
    shutil.copytree(world["model"], model)
    weights = model / "model.safetensors"
    header, buffer = _read_header(weights)
    if data.draw(st.booleans(), label="raw-bytes"):
        text = data.draw(mutated_text(json.dumps(header)), label="header-text").encode("utf-8", "surrogatepass")
    else:
        text = json.dumps(data.draw(mutated_headers(header), label="header")).encode()
    cut = data.draw(st.sampled_from([0, 0, 0, 1, 64]), label="truncate")
    weights.write_bytes(struct.pack("<Q", len(text)) + text + buffer[: len(buffer) - cut])
    try:
        check_safetensors(weights, where="source.path")
        accepted = True
    except SourceError:
        accepted = False
    event(f"header {'accepted' if accepted else 'refused'}")
    assert accepted == _library_loads(weights)  # refused exactly when the library cannot load it
    recipe = write_recipe(model.parent, model, world["wikitext"])
    code, _, err = invoke("plan", recipe, "--cache-dir", world["cache"], "--storage", world["storage"])
    assert_clean(code, err, "plan")
    assert code == (0 if accepted else 2), err
    shutil.rmtree(model.parent)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_any_config_json_is_planned_cleanly(world, tmp_path_factory, data):
    model = tmp_path_factory.mktemp("src") / "model"
    shutil.copytree(world["model"], model)
    config = json.loads((model / "config.json").read_text())
    if data.draw(st.booleans(), label="structural"):
        value = data.draw(mutated_trees(config) | json_values, label="config")
        text = json.dumps(value)
    else:
        text = data.draw(mutated_text(json.dumps(config, indent=2)), label="text")
    (model / "config.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    recipe = write_recipe(model.parent, model, world["wikitext"])
    code, _, err = invoke("plan", recipe, "--cache-dir", world["cache"], "--storage", world["storage"])
    assert_clean(code, err, "plan")
    assert code in (0, 2)
    event(f"plan exit {code}")
    shutil.rmtree(model.parent)


# --- store files: index.json, manifests, channel pointers --------------------------------------


@pytest.fixture(scope="module")
def published(world) -> dict:
    """One published version of the tiny recipe, built once for the module (~15 s)."""
    store = world["root"] / "published"
    code, _, err = invoke("run", world["recipe"], "--cache-dir", world["cache"], "--storage", store,
                          "--report-dir", world["root"] / "run-reports")
    assert code == 0, err
    files = sorted(p.relative_to(store).as_posix() for p in store.rglob("*.json")
                   if p.name in ("index.json", "manifest.json") or p.parent.name == "channels")
    return {"store": store, "files": files}


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_any_store_file_is_read_cleanly(world, published, tmp_path_factory, data):
    store = tmp_path_factory.mktemp("store") / "s"
    shutil.copytree(published["store"], store)
    rel = data.draw(st.sampled_from(published["files"]), label="file")
    path = store / rel
    os.chmod(path, 0o644)  # published files are read-only; this one is being damaged on purpose
    original = json.loads(path.read_text())
    kind = data.draw(st.sampled_from(["structural", "any-json", "text"]), label="kind")
    if kind == "structural":
        text = json.dumps(data.draw(mutated_trees(original), label="value"))
    elif kind == "any-json":
        text = json.dumps(data.draw(json_values, label="value"))
    else:
        text = data.draw(mutated_text(json.dumps(original, indent=2)), label="text")
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    version = next(p.parent for p in store.rglob("manifest.json"))
    for args in (["list", "--storage", store], ["list", "--json", "--storage", store],
                 ["show", "tiny/fp8", "--storage", store], ["verify", version],
                 ["reindex", "--storage", store]):
        code, _, err = invoke(*args)
        event(f"{args[0]} exit {code}")
        assert_clean(code, err, f"{rel}: {' '.join(map(str, args))}")
    shutil.rmtree(store.parent)
