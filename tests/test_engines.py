"""The engine catalogue (pipeline.engines): every record complete, every consumer covering exactly
the catalogue's engines, the legacy ``llama.cpp`` spelling of stored manifests still read, and
one spelling written."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import pytest
import yaml

from pipeline import engines
from pipeline.engines import CATALOGUE, IDS


def _targets(*gpus: str):
    from pipeline.recipe.schema import GPUTarget

    return [GPUTarget(gpu=g) for g in gpus]


def test_every_record_is_complete():
    from pipeline.publishing.serving import BUILDERS

    assert len(set(IDS)) == len(IDS) == len(CATALOGUE)
    for e in CATALOGUE:
        for f in fields(e):
            value = getattr(e, f.name)
            if f.name in ("profiles", "recommended_on", "starter", "thread_flags"):
                continue  # optional by design; checked below
            assert value is not None and value != "" and value != (), (e.id, f.name)
        assert engines.canonical(e.id) == e.id and engines.get(e.id) is e
        assert e.image.count(":") == 1 and 0 < e.port < 65536
        assert e.profiles is None or e.profiles in BUILDERS, e.id
        assert e.recommended_on in (None, "cpu", "gpus")
        assert (e.recommended_on == "cpu") == e.cpu  # a CPU engine is recommended on the CPU
        assert bool(e.thread_flags) == e.cpu  # a CPU engine's replicas can be given their cores
    assert {e.profiles for e in CATALOGUE if e.profiles} == set(BUILDERS)  # no builder without an engine
    assert engines.CPU_IDS == ("llamacpp",)


def test_the_recipe_schema_takes_the_catalogue_ids_and_its_cpu_rule():
    from pydantic import ValidationError

    from pipeline.recipe.schema import ReportTarget

    assert get_args(ReportTarget.model_fields["engine"].annotation) == IDS
    for e in CATALOGUE:
        assert ReportTarget(engine=e.id, gpu="H100").engine == e.id
        if e.cpu:
            assert ReportTarget(engine=e.id, gpu="cpu").gpu == "cpu"
        else:
            with pytest.raises(ValidationError, match="does not run on a CPU; only llamacpp does"):
                ReportTarget(engine=e.id, gpu="cpu")
    with pytest.raises(ValidationError):
        ReportTarget(engine="llama.cpp", gpu="cpu")  # recipes use the one spelling


def test_deploy_runs_every_engine_in_its_image_on_its_port():
    from pipeline.publishing.deploy import compose

    manifest = {"model": "m", "variant": "v", "version": "20260101T000000Z-abc", "format": {"format": "f", "scheme": "s"},
                "files": []}
    for e in CATALOGUE:
        profile = {"name": f"{e.id}-p", "engine": e.id, "gpus": [], "command": "server /store/m/v --flag 1"}
        files = compose(manifest=manifest, storage_url="/store", location="/store/m/v", profile=profile, replicas=1,
                        local_root="/store")
        text = files["docker-compose.yml"]
        replica = yaml.safe_load(text)["services"]["replica-1"]
        assert replica["image"] == e.image and f"localhost:{e.port}/health" in replica["healthcheck"]["test"][-1]
        assert f"served by {e.name} " in text.splitlines()[0]
        assert ("entrypoint" not in replica) == e.image_runs_server
        assert ("ipc" in replica) == e.ipc_host
        assert ("deploy" in replica) == (not e.cpu)  # GPUs reserved for GPU engines only


def test_model_cards_tag_and_name_every_engine():
    from pipeline.publishing.model_card import model_card, tags

    for e in CATALOGUE:
        manifest = {"model": "m", "variant": "v", "format": {"engines": [e.id]}, "serve": {e.id: "serve /v"},
                    "variant_spec": {}}
        assert set(e.tags) <= set(tags(manifest))
        assert f"**{e.long_name}**" in model_card(manifest, None)


def test_report_names_and_targets_come_from_the_catalogue():
    from pipeline.report.recommend import Target, default_targets

    assert [Target(e.id, "H100").label for e in CATALOGUE] == [f"{e.name} on H100" for e in CATALOGUE]
    targets = default_targets(set(IDS), ["L40S"])
    assert [(t.engine, t.gpu) for t in targets] == [("vllm", "L40S"), ("trtllm", "L40S"), ("llamacpp", "cpu")]
    assert {t.engine for t in targets} == {e.id for e in CATALOGUE if e.recommended_on}


def test_init_offers_every_starter_engine():
    from pipeline.starter import ENGINE_TITLES, ENGINES, Shapes, choose, parse_engines

    assert ENGINES == tuple(e.id for e in CATALOGUE if e.starter) == parse_engines(None)
    assert set(ENGINE_TITLES) == set(ENGINES)
    shapes = Shapes("LlamaForCausalLM", 4096, 2, 32, 8, 4096, (("model.layers.0.mlp.up_proj", 4096),),
                    (("blk.0.ffn_up.weight", 4096),))
    chosen = {c.engine for c in choose(shapes, ENGINES, {"H100": 9.0, "B200": 10.0}) if c.variant is not None}
    assert chosen == set(ENGINES)  # init has variants for every engine the catalogue says it offers


def test_each_backend_declares_catalogue_engines_and_profiles_use_the_one_spelling():
    from pipeline.backends import get_backend
    from pipeline.publishing.serving import profiles_for

    cases = [
        ("llamacpp", SimpleNamespace(type="Q4_K_M", kv_cache_types=[])),
        ("llmcompressor", SimpleNamespace(scheme="FP8_DYNAMIC", kv_cache_scheme="fp8")),
        ("modelopt", SimpleNamespace(qformat="fp8", kv_cache_qformat="fp8")),
    ]
    seen = set()
    for name, variant in cases:
        backend = get_backend(name)
        info = backend.describe(variant)
        assert set(info.engines) <= set(IDS) and set(info.serve) <= set(info.engines), name
        profiles = profiles_for(backend, variant, _targets("H100"))
        assert profiles and {p["engine"] for p in profiles} <= set(info.engines), name
        seen |= set(info.engines)
    assert seen == set(IDS)
    gguf = profiles_for(get_backend("llamacpp"), cases[0][1], _targets("H100"))
    assert [p["engine"] for p in gguf] == ["llamacpp", "llamacpp"]
    assert [p["name"] for p in gguf] == ["llamacpp-q4_k_m-cpu", "llamacpp-q4_k_m-gpu"]
    # ModelOpt: TensorRT-LLM's profiles, then vLLM's (the order the format lists its engines).
    mo = profiles_for(get_backend("modelopt"), cases[2][1], _targets("H100"))
    assert [p["name"] for p in mo] == ["trtllm-fp8-tp1", "vllm-fp8-fp8_kv-tp1"]
    assert mo[0]["options"]["kv_cache_config"]["dtype"] == "fp8"


def test_canonical_maps_the_legacy_spelling_only():
    assert engines.canonical("llama.cpp") == engines.canonical("LlamaCpp") == "llamacpp"
    assert engines.canonical("tensorrt") is None and engines.find("nope") is None
    assert engines.display("llama.cpp") == engines.display("llamacpp") == "llama.cpp"
    assert engines.display("somethingelse") == "somethingelse"
    assert engines.loads(["llama.cpp"], "llamacpp") and not engines.loads(["vllm"], "llamacpp")
    assert engines.gpu_range({"llama.cpp": [None, None], "vllm": [8.9, None]}, "vllm") == [8.9, None]
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="unknown engine 'nope'"):
        engines.get("nope")


def _legacy_manifest() -> dict:
    """A GGUF manifest as published before the one spelling: ``llama.cpp`` everywhere."""
    return {"format": {"format": "gguf", "scheme": "Q4_K_M", "weight_bits": 4.5, "engines": ["llama.cpp"],
                       "min_compute_capability": None, "serve": {"llama.cpp": "llama-server -m {path}/model.gguf"},
                       "gpus": {"llama.cpp": [None, None]}},
            "metrics": {"mean_kld": 0.1, "ppl": 30.0}, "gate": {"passed": True}, "size_bytes": 5,
            "source": {"kind": "local", "path": "/x"},
            "serving_profiles": [{"name": "llamacpp-q4_k_m-cpu", "engine": "llama.cpp", "gpus": [],
                                  "args": ["--port", "8080"],
                                  "command": "llama-server -m {path}/model.gguf --port 8080"}]}


def test_a_stored_manifest_with_the_legacy_spelling_is_read(tmp_path):
    from pipeline.publishing.deploy import compose, pick_profile
    from pipeline.report.data import collect
    from pipeline.report.render import min_gpu, use_case
    from pipeline.storage.consume import select
    from pipeline.storage.location import open_storage
    from pipeline.storage.publish import publish_variant
    from pipeline.storage.refs import parse_ref
    from pipeline.storage.registry import read_index, resolve

    src = tmp_path / "src"
    src.mkdir()
    (src / "model.gguf").write_bytes(b"GGUF!")
    store = open_storage(str(tmp_path / "store"))
    publish_variant(store, model="m", variant="q4", build_key="a" * 64, files_from=src, manifest=_legacy_manifest())
    index = read_index(store)
    assert index["entries"][0]["engines"] == ["llama.cpp"]  # stored as published: never rewritten
    for engine, gpu in (("llamacpp", "cpu"), ("llamacpp", "H100"), ("llama.cpp", "cpu")):
        best, why = select(index, engine=engine, gpu=gpu, max_gb=None, max_kld=None)
        assert best is not None and best["variant"] == "q4", why
        assert "1 load in llama.cpp" in why
    assert select(index, engine="vllm", gpu="H100", max_gb=None, max_kld=None)[0] is None
    [row] = collect(store, "m")
    assert row.engines == ["llamacpp"] and min_gpu(row) == "none (CPU)"
    assert use_case(row, []) == "llama.cpp on CPU or any GPU"
    version, manifest, _raw = resolve(store, parse_ref("m/q4"))
    profile = pick_profile(manifest, "llamacpp", None)
    files = compose(manifest=manifest, storage_url=store.url, location=store.location(f"m/q4/{version}"),
                    profile=profile, replicas=1, local_root=str(Path(store.local_path(""))))
    assert "image: ghcr.io/ggml-org/llama.cpp:server" in files["docker-compose.yml"]
    assert "served by llama.cpp " in files["docker-compose.yml"]
