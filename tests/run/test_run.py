"""`modelbuild run` end to end on the tiny model: cache, gates, publish, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.backends.llmcompressor import LLMCompressorBackend
from tests.conftest import REPO, WIKITEXT


def _published(storage: Path) -> list[Path]:
    return sorted(p.parent for p in storage.rglob("manifest.json"))


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "objects").glob("*/*")) if (cache / "objects").exists() else []


def test_run_publishes_a_verifiable_gated_variant(cli, recipe_factory, dirs):
    recipe = recipe_factory()
    code, out, err = cli("run", recipe)
    assert code == 0, err
    assert "fp8" in out and "pass" in out
    [version] = _published(dirs["storage"])
    assert version.parent.name == "fp8" and version.parent.parent.name == "tiny"
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["gate"]["passed"] is True
    assert manifest["format"]["format"] == "compressed-tensors" and manifest["format"]["engines"] == ["vllm"]
    assert manifest["serve"]["vllm"] == f"vllm serve {version}"
    assert manifest["source"]["kind"] == "local" and len(manifest["recipe"]["sha256"]) == 64
    assert set(manifest["metrics"]) >= {"ppl", "ppl_ratio", "mean_kld", "p99_kld", "top1"}
    assert manifest["data"]["eval"]["sha256"] and manifest["tools"]["llmcompressor"]
    assert "simulated" in manifest["evaluation"]["method"]
    assert {f["path"] for f in manifest["files"]} >= {"model.safetensors", "config.json", "recipe.yaml"}
    code, out, _ = cli("verify", version)
    assert code == 0 and "ok" in out
    # No staging folder or cache temp folder stays behind.
    assert not [p for p in dirs["storage"].rglob(".staging-*")]
    assert not any((dirs["cache"] / "tmp").iterdir())


def test_second_run_is_a_no_op(cli, recipe_factory, dirs, monkeypatch):
    recipe = recipe_factory()
    assert cli("run", recipe)[0] == 0
    calls = []
    monkeypatch.setattr(LLMCompressorBackend, "quantize", lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(LLMCompressorBackend, "load_for_eval", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(LLMCompressorBackend, "scores", lambda *a, **k: calls.append(a) or iter(()))
    code, _, err = cli("run", recipe)
    assert code == 0, err
    assert calls == []
    assert "running" not in err and "already published" in err
    assert len(_published(dirs["storage"])) == 1
    code, out, _ = cli("plan", recipe)
    assert code == 0 and "to build" not in out


def test_gate_threshold_change_regates_without_requantizing(cli, recipe_factory, dirs, monkeypatch):
    assert cli("run", recipe_factory())[0] == 0
    calls = []
    monkeypatch.setattr(LLMCompressorBackend, "quantize", lambda *a, **k: calls.append(a) or {})
    code, out, err = cli("run", recipe_factory(gate="max_kld: 0.0"))
    assert calls == []
    assert code == 3
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert "gate failed: fp8: mean_kld" in lines[0] and "allowed max 0" in lines[0]
    assert "FAIL" in out


def test_failing_gate_publishes_nothing(cli, recipe_factory, dirs):
    code, _, err = cli("run", recipe_factory(gate="min_top1: 1.0\n    max_kld: 0.0"))
    assert code == 3
    assert "gate failed: fp8: mean_kld" in err
    assert _published(dirs["storage"]) == []


def test_eval_loads_weights_exactly_as_stored(cli, recipe_factory, dirs):
    import torch
    from safetensors.torch import load_file

    assert cli("run", recipe_factory())[0] == 0
    [version] = _published(dirs["storage"])
    stored = load_file(str(version / "model.safetensors"))
    assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    # Unquantized tensors went back to the source dtype.
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    model = LLMCompressorBackend().load_for_eval(version, "cpu")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        expected = stored[f"{name}.weight"].float() * stored[f"{name}.weight_scale"].float()
        got = model.get_submodule(name).weight
        assert torch.equal(got, expected)
    assert model.modelbuild_simulated_layers == 14  # 7 linear layers x 2 blocks get FP8 inputs


def test_activation_simulation_changes_outputs(cli, recipe_factory, dirs):
    """The simulated FP8 activations really run: removing the hooks changes the logits."""
    import torch

    assert cli("run", recipe_factory())[0] == 0
    [version] = _published(dirs["storage"])
    model = LLMCompressorBackend().load_for_eval(version, "cpu")
    ids = torch.arange(64)[None]
    with torch.no_grad():
        with_act = model(ids).logits
        for m in model.modules():
            m._forward_pre_hooks.clear()
        without = model(ids).logits
    assert not torch.equal(with_act, without)


def _bad_recipe(case: str, make, tmp_path: Path, tiny_model: Path) -> Path:
    """A recipe (and files) exhibiting one bad input."""
    test_txt = str(WIKITEXT / "test.txt")

    def model_copy() -> Path:
        import shutil

        return Path(shutil.copytree(tiny_model, tmp_path / "model"))

    def local(path: Path, extra: str = "") -> str:
        return f"source:\n  kind: local\n  path: {path}\n{extra}"

    if case == "malformed_yaml":
        path = make()
        path.write_text(path.read_text().replace("eval:\n", "eval: [\n"))
    elif case == "unknown_key":
        path = make(variant_extra="    bits: 8\n")
    elif case == "unknown_backend":
        path = make()
        path.write_text(path.read_text().replace("backend: llmcompressor", "backend: autoawq"))
    elif case == "gate_out_of_range":
        path = make(gate="min_top1: 2")
    elif case == "missing_source":
        path = make(source=local(tmp_path / "absent"))
    elif case == "no_weights":
        model = model_copy()
        (model / "model.safetensors").unlink()
        path = make(source=local(model))
    elif case == "truncated_weights":
        model = model_copy()
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[:-1000])
        path = make(source=local(model))
    elif case == "pickle_only":
        import torch
        from safetensors.torch import load_file

        model = model_copy()
        torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
        (model / "model.safetensors").unlink()
        path = make(source=local(model))
    elif case == "corpus_missing":
        path = make()
        path.write_text(path.read_text().replace("test.txt", "absent.txt"))
    elif case == "corpus_short":
        short = tmp_path / "short.txt"
        short.write_text("only a few words here " * 30)
        path = make()
        path.write_text(path.read_text().replace(test_txt, str(short)))
    elif case == "calibration_is_eval":
        path = make()
        path.write_text(path.read_text().replace("valid.txt", "test.txt"))
    elif case == "calibration_same_content":
        copy = tmp_path / "copy-of-test.txt"
        copy.write_bytes(Path(test_txt).read_bytes())
        # FP8_DYNAMIC ignores calibration; a calibrated variant would read it. Until one exists,
        # the same-content check is exercised through the planner directly (see below).
        path = make()
        path.write_text(path.read_text().replace(str(WIKITEXT / "valid.txt"), str(copy)))
    else:
        raise AssertionError(case)
    return path


BAD_INPUTS = {
    "malformed_yaml": "malformed YAML",
    "unknown_key": "variants.0.bits: unknown key",
    "unknown_backend": "unknown backend 'autoawq'",
    "gate_out_of_range": "eval.gate.min_top1",
    "missing_source": "source folder not found",
    "no_weights": "no weights",
    "truncated_weights": "truncated safetensors file model.safetensors",
    "pickle_only": "allow_pickle",
    "corpus_missing": "eval.corpus file not found",
    "corpus_short": "corpus too short",
    "calibration_is_eval": "same file",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_nothing(cli, recipe_factory, dirs, tmp_path, tiny_model, case):
    recipe = _bad_recipe(case, recipe_factory, tmp_path, tiny_model)
    code, _, err = cli("run", recipe)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert BAD_INPUTS[case] in lines[0]
    assert _published(dirs["storage"]) == []
    assert _entries(dirs["cache"]) == []


def test_calibration_with_the_eval_text_under_another_name(recipe_factory, tmp_path, tiny_model, monkeypatch):
    """Same bytes, different path: caught by digest at plan time for calibrated variants."""
    from pipeline.backends.llmcompressor import LLMCompressorVariant
    from pipeline.errors import DataError
    from pipeline.plan.build import corpus_digests
    from pipeline.recipe import load_recipe

    recipe = load_recipe(_bad_recipe("calibration_same_content", recipe_factory, tmp_path, tiny_model)).recipe
    monkeypatch.setattr(LLMCompressorVariant, "needs_calibration", lambda self: True)
    with pytest.raises(DataError, match="same content"):
        corpus_digests(recipe)


def test_pickle_weights_with_opt_in_build(cli, recipe_factory, dirs, tmp_path, tiny_model):
    recipe = _bad_recipe("pickle_only", recipe_factory, tmp_path, tiny_model)
    recipe.write_text(recipe.read_text().replace("  path: ", "  allow_pickle: true\n  path: ", 1))
    code, _, err = cli("run", recipe)
    assert code == 0, err
    assert len(_published(dirs["storage"])) == 1


def test_corpus_shorter_in_tokens_than_characters(cli, recipe_factory, dirs, tmp_path):
    """Passes the cheap character check, fails the exact token count, still at plan time (the
    local source's tokenizer is at hand): nothing is fetched or built."""
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij " * 300)  # 3,300 characters, far fewer tokens than 3,000
    recipe = recipe_factory(tokens=3000)
    recipe.write_text(recipe.read_text().replace(str(WIKITEXT / "test.txt"), str(short)))
    code, _, err = cli("run", recipe)
    assert code == 2 and "eval corpus too short: it has" in err and "eval.tokens asks 3000" in err
    assert _entries(dirs["cache"]) == []


def test_storage_root_not_writable(cli, recipe_factory, dirs, tmp_path):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    code, _, err = cli("run", recipe_factory(), "--storage", blocker / "sub")
    assert code == 2
    assert "storage root is not writable" in err and err.count("\n") == 1
    assert _entries(dirs["cache"]) == []  # nothing ran


def test_missing_backend_library_is_named(cli, recipe_factory, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llmcompressor" else real(n, *a))
    code, _, err = cli("run", recipe_factory())
    assert code == 2 and "modelbuild[llmcompressor]" in err


def test_verify_reports_each_mismatch(cli, recipe_factory, dirs):
    assert cli("run", recipe_factory())[0] == 0
    [version] = _published(dirs["storage"])
    with open(version / "config.json", "a") as f:
        f.write(" ")
    (version / "tokenizer.json").unlink()
    (version / "extra.txt").write_text("x")
    code, _, err = cli("verify", version)
    assert code == 5
    assert "size differs: config.json" in err and "missing: tokenizer.json" in err
    assert "not in manifest: extra.txt" in err


def test_publish_copies_never_links(tmp_path):
    from pipeline.storage.local import LocalStorage
    from pipeline.storage.publish import publish_variant

    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"w" * 10)
    manifest = {"format": {"serve": {}}}
    out = publish_variant(LocalStorage(tmp_path / "store"), model="m", variant="v", build_key="k" * 64, files_from=src,
                          manifest=manifest)
    copy = Path(out["path"]) / "w.bin"
    assert copy.read_bytes() == b"w" * 10 and copy.stat().st_ino != (src / "w.bin").stat().st_ino


def _spawn_run(recipe: Path, dirs, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(recipe), "--cache-dir", str(dirs["cache"]),
         "--storage", str(dirs["storage"])],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell without job control starts background jobs (CI's, `cmd &`, nohup) with SIGINT
        # ignored, and that disposition is inherited: Python then keeps SIGINT ignored and the run
        # never sees the Ctrl-C (it went on and exited 0). A terminal's Ctrl-C reaches a run whose
        # SIGINT is at its default, so give the child that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_file(proc: subprocess.Popen, path: Path, timeout=300.0) -> None:
    """Wait until the held stage says it is running (an event, not a guess at its duration);
    the timeout only bounds a broken run."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the held stage was running: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the held stage did not start within {timeout:g} s")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "ctrl-c"])
def test_killed_mid_stage_resumes(recipe_factory, dirs, tmp_path, sig):
    """The baseline stage is held with its output written but not committed (MODELBUILD_TEST_HOLD)
    until the signal lands: interrupted mid-stage on any machine, however fast."""
    from pipeline.executors.scheduler import HOLD_ENV

    recipe = recipe_factory()
    ready = tmp_path / "baseline-running"
    proc = _spawn_run(recipe, dirs, {HOLD_ENV: f"baseline={ready}"})
    _wait_for_file(proc, ready)
    assert any((dirs["cache"] / "tmp").iterdir())  # the stage's uncommitted output is there
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    finished_before = {p.name for p in _entries(dirs["cache"])}
    assert len(finished_before) == 1  # fetch only: the held baseline was never committed
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        [line] = [x for x in err.splitlines() if x.startswith("error:")]
        assert "interrupted during stage baseline" in line and "rerun" in line
        assert not any((dirs["cache"] / "tmp").iterdir())  # cleaned on the way out
    else:
        assert proc.returncode == -signal.SIGKILL
    assert _published(dirs["storage"]) == []

    proc = _spawn_run(recipe, dirs)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "[1/6] fetch: cached" in err and "baseline: done" in err  # finished stages are reused
    assert finished_before <= {p.name for p in _entries(dirs["cache"])}
    assert not any((dirs["cache"] / "tmp").iterdir())  # the killed writer's temp folder is gone
    assert len(_published(dirs["storage"])) == 1


def _sigint_disposition(pid: int) -> str:
    """``ignored``, ``caught`` or ``default``, from the kernel's view of the process."""
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGINT - 1)
    if int(status["SigIgn"], 16) & bit:
        return "ignored"
    return "caught" if int(status["SigCgt"], 16) & bit else "default"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
@pytest.mark.parametrize("parent", ["ignores", "default"])
def test_a_run_catches_ctrl_c_unless_its_parent_ignores_it(recipe_factory, dirs, tmp_path, parent):
    """The cause of the ctrl-c test's exit 0: a run started with SIGINT ignored (as a shell without
    job control starts background jobs, e.g. CI's) inherits that and the kernel drops the signal;
    modelbuild and its libraries swallow nothing — started at the default, the run catches it."""
    from pipeline.executors.scheduler import HOLD_ENV

    ready = tmp_path / "baseline-running"
    disposition = signal.SIG_IGN if parent == "ignores" else signal.SIG_DFL
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(recipe_factory()), "--cache-dir", str(dirs["cache"]),
         "--storage", str(dirs["storage"])], cwd=REPO, env={**os.environ, HOLD_ENV: f"baseline={ready}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    try:
        _wait_for_file(proc, ready)  # torch, transformers and llm-compressor are all imported by now
        assert _sigint_disposition(proc.pid) == ("ignored" if parent == "ignores" else "caught")
    finally:
        proc.kill()
        proc.communicate()


def test_hub_source_offline_writes_lock(recipe_factory, dirs, tiny_model, tmp_path):
    """The Hub path end to end, offline from a pre-populated cache: the branch is pinned to its
    commit in <recipe>.lock.json and the commit enters the manifest."""
    from tests.sources.test_sources import populate_hub_cache

    commit = "0123456789abcdef0123456789abcdef01234567"
    populate_hub_cache(tmp_path / "hub", "acme/tiny", tiny_model, commit)
    recipe = recipe_factory(source="source:\n  kind: hub\n  repo: acme/tiny\n  revision: main\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(recipe), "--cache-dir", str(dirs["cache"]),
         "--storage", str(dirs["storage"])], cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lock = json.loads(recipe.with_name("recipe.lock.json").read_text())
    assert lock["source"] == {"kind": "hub", "repo": "acme/tiny", "revision": "main", "commit": commit}
    [version] = _published(dirs["storage"])
    assert json.loads((version / "manifest.json").read_text())["source"]["commit"] == commit


def test_topk_form_is_a_lower_bound_of_the_exact_kld(cli, recipe_factory, dirs):
    assert cli("run", recipe_factory())[0] == 0
    [exact] = _published(dirs["storage"])
    exact_m = json.loads((exact / "manifest.json").read_text())
    assert exact_m["evaluation"]["kld"].startswith("exact")
    # Only the baseline and evaluation rebuild: the quantized checkpoint is reused.
    code, _, err = cli("run", recipe_factory(eval_extra="  top_k: 32\n"))
    assert code == 0, err
    assert "quantize/fp8: cached" in err and "baseline: done" in err
    topk = [p for p in _published(dirs["storage"]) if p != exact]
    topk_m = json.loads((topk[0] / "manifest.json").read_text())
    assert topk_m["evaluation"]["kld"].startswith("lower bound")
    assert topk_m["metrics"]["mean_kld"] <= exact_m["metrics"]["mean_kld"] + 1e-7
    assert topk_m["metrics"]["ppl"] == pytest.approx(exact_m["metrics"]["ppl"])
    assert topk_m["metrics"]["top1"] == exact_m["metrics"]["top1"]


def test_plan_time_checks_are_remembered(cli, recipe_factory, monkeypatch):
    """A rerun does not read the model's config again for checks that passed with the same
    source, variant and tool versions (keeps no-op reruns free of model-library imports)."""
    recipe = recipe_factory()
    assert cli("plan", recipe)[0] == 0
    import pipeline.plan.build as build

    def boom(*a, **k):
        raise AssertionError("config read again")

    monkeypatch.setattr(build, "_model_config", boom)
    code, _, err = cli("plan", recipe)
    assert code == 0, err
    # A changed variant is checked again (the error boundary reports the raise as a bug, exit 1).
    code, _, err = cli("plan", recipe_factory(variant_extra="    ignore: [lm_head, model.layers.0.mlp.down_proj]\n"))
    assert code == 1 and "config read again" in err


def test_hub_unreachable_is_one_clear_line(recipe_factory, dirs, tmp_path):
    """An endpoint nobody answers (huggingface_hub raises httpx errors, not OSErrors)."""
    recipe = recipe_factory(source="source:\n  kind: hub\n  repo: acme/tiny\n  revision: main\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(recipe), "--cache-dir", str(dirs["cache"])],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot reach the Hub: ConnectError" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1


def test_every_run_writes_json_junit_and_markdown(cli, recipe_factory, tmp_path, monkeypatch):
    """Passing and failing gates as JUnit test cases a CI system reads (parsed with junitparser,
    the library CI tooling uses), a JSON summary, and the Markdown appended to GitHub's job summary."""
    from junitparser import Failure, JUnitXml

    step_summary = tmp_path / "step.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step_summary))
    ok_dir, bad_dir = tmp_path / "ok", tmp_path / "bad"
    assert cli("run", recipe_factory(), "--report-dir", ok_dir)[0] == 0
    summary = json.loads((ok_dir / "summary.json").read_text())
    assert summary["exit_code"] == 0 and [r["status"] for r in summary["variants"]] == ["passed"]
    assert summary["variants"][0]["metrics"]["mean_kld"] >= 0 and summary["baseline"]["ppl"] > 0
    code, _, _ = cli("run", recipe_factory(gate="max_kld: 0.0000001"), "--report-dir", bad_dir)
    assert code == 3
    xml = JUnitXml.fromfile(str(bad_dir / "junit.xml"))
    [suite] = list(xml)
    [case] = list(suite)
    assert suite.tests == 1 and suite.failures == 1 and case.name == summary["variants"][0]["variant"]
    assert isinstance(case.result[0], Failure) and "mean_kld" in case.result[0].message
    assert json.loads((bad_dir / "summary.json").read_text())["exit_code"] == 3
    text = step_summary.read_text()
    assert "✅ passed" in text and "❌ gate failed" in text and "| variant | status |" in text


def test_a_stopped_run_still_reports(cli, recipe_factory, tmp_path):
    """A run that stops on an unwritable store still leaves JSON and JUnit saying why."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, _ = cli("run", recipe_factory(), "--storage", blocker / "store", "--report-dir", tmp_path / "r")
    assert code == 2
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["exit_code"] == 2 and "not writable" in summary["error"]
    assert 'errors="1"' in (tmp_path / "r" / "junit.xml").read_text()


def test_locked_run_refuses_what_changed_since_the_lock(cli, recipe_factory, tmp_path):
    """`lock` records source, data, recipe and tools; `run --locked` names each difference."""
    recipe = recipe_factory()
    code, _, err = cli("run", recipe, "--locked")
    assert code == 2 and "no lock file" in err and "modelbuild lock" in err
    assert cli("lock", recipe)[0] == 0
    lock = json.loads(recipe.with_name("recipe.lock.json").read_text())
    assert lock["lock_version"] == 2 and set(lock["data"]) >= {"eval"} and lock["tools"]["torch"]
    assert cli("run", recipe, "--locked")[0] == 0
    assert "unchanged" in cli("lock", recipe)[1]
    lock["tools"]["torch"] = "0.0.1"  # as if the lock came from an older toolchain
    recipe.with_name("recipe.lock.json").write_text(json.dumps(lock))
    code, _, err = cli("run", recipe, "--locked")
    assert code == 2 and "tools.torch: 0.0.1 →" in err
    assert cli("lock", recipe)[0] == 0
    recipe.write_text(recipe.read_text().replace("max_kld: 1.0", "max_kld: 2.0"))
    code, _, err = cli("run", recipe, "--locked")
    assert code == 2 and "recipe_sha256" in err


def test_locked_run_refuses_a_moved_upstream(recipe_factory, dirs, tiny_model, tmp_path):
    """A Hub branch that moved to a new commit since the lock: --locked refuses, naming both."""
    from tests.sources.test_sources import populate_hub_cache

    old, new = "1" * 40, "2" * 40
    populate_hub_cache(tmp_path / "hub", "acme/tiny", tiny_model, old)
    recipe = recipe_factory(source="source:\n  kind: hub\n  repo: acme/tiny\n  revision: main\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}

    def modelbuild(*args):
        return subprocess.run([sys.executable, "-m", "pipeline", *args, "--cache-dir", str(dirs["cache"])], cwd=REPO,
                              env=env, capture_output=True, text=True)

    assert modelbuild("lock", str(recipe)).returncode == 0
    populate_hub_cache(tmp_path / "hub", "acme/tiny", tiny_model, new)  # the branch now points at `new`
    refused = modelbuild("run", str(recipe), "--locked", "--storage", str(dirs["storage"]))
    assert refused.returncode == 2 and f"source.commit: {old[:12]}… → {new[:12]}…" in refused.stderr


def _counting(monkeypatch) -> list[str]:
    """Record which variants the backend quantizes and evaluates, still calling through."""
    calls: list[str] = []
    quantize, scores = LLMCompressorBackend.quantize, LLMCompressorBackend.scores

    def counted_quantize(self, variant, *a, **k):
        calls.append(f"quantize {variant.name}")
        return quantize(self, variant, *a, **k)

    def counted_scores(self, *a, **k):
        calls.append("evaluate")
        return scores(self, *a, **k)

    monkeypatch.setattr(LLMCompressorBackend, "quantize", counted_quantize)
    monkeypatch.setattr(LLMCompressorBackend, "scores", counted_scores)
    return calls


def test_one_variant_changed_rebuilds_only_that_variant(cli, recipe_factory, monkeypatch):
    two = "  - name: w8a16\n    backend: llmcompressor\n    scheme: W8A16\n    group_size: {}\n"
    assert cli("run", recipe_factory(extra=two.format(32)))[0] == 0
    calls = _counting(monkeypatch)
    code, _, err = cli("run", recipe_factory(extra=two.format(64)))
    assert code == 0, err
    assert calls == ["quantize w8a16", "evaluate"]
    assert "baseline: running" not in err


def test_new_upstream_content_rebuilds_everything_after_fetch(cli, recipe_factory, tiny_model, tmp_path, monkeypatch):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    two = "  - name: w8a16\n    backend: llmcompressor\n    scheme: W8A16\n    group_size: 32\n"
    recipe = recipe_factory(source=f"source:\n  kind: local\n  path: {model}\n", extra=two)
    assert cli("run", recipe)[0] == 0
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 50000.0}))
    calls = _counting(monkeypatch)
    code, _, err = cli("run", recipe)
    assert code == 0, err
    assert sorted(calls) == ["evaluate", "evaluate", "quantize fp8", "quantize w8a16"]
    assert "fetch: running" in err and "baseline: running" in err
