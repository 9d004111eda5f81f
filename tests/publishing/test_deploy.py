"""Deployment files generated from the registry, validated against the Compose specification's
JSON schema (as shipped in the docker-compose 1.29.2 package on PyPI, fetched at test time) and
checked for what a serving team relies on: N replicas running the published profile, weights
from the shared store, health checks gating the load balancer."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.storage.test_storage import _cli, _manifest, _variant_dir


@pytest.fixture(scope="session")
def compose_schema(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("compose-spec")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder),
                    "docker-compose==1.29.2"], check=True, capture_output=True, timeout=300)
    [wheel] = folder.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        return json.loads(z.read("compose/config/compose_spec.json"))


def _publish_with_profiles(url: str, tmp_path: Path) -> str:
    from pipeline.publishing.serving import llamacpp_profiles
    from pipeline.storage.location import open_storage
    from pipeline.storage.publish import publish_variant

    class _V:  # the fields llamacpp_profiles reads
        type = "Q4_K_M"
        kv_cache_types: list[str] = []

    manifest = _manifest(engines=("llamacpp",), cc=None)
    manifest["serving_profiles"] = [{**p, "command": p["command"].replace("{file}", "model.safetensors")}
                                    for p in llamacpp_profiles(None, _V, None, [])]
    out = publish_variant(open_storage(url), model="m", variant="q4", build_key="d" * 64,
                          files_from=_variant_dir(tmp_path, "q4"), manifest=manifest)
    return out["version"]


def _validate(doc: dict, schema: dict) -> None:
    import jsonschema

    jsonschema.validate(doc, schema)


def test_compose_from_a_filesystem_store(tmp_path, compose_schema):
    store = tmp_path / "store"
    version = _publish_with_profiles(str(store), tmp_path)
    out = tmp_path / "deploy"
    done = _cli("deploy", "m/q4", str(out), "--replicas", "3", "--storage", str(store))
    assert done.returncode == 0, done.stderr
    doc = yaml.safe_load((out / "docker-compose.yml").read_text())
    _validate(doc, compose_schema)
    replicas = {k: v for k, v in doc["services"].items() if k.startswith("replica-")}
    assert len(replicas) == 3
    for service in replicas.values():
        assert service["image"].startswith("ghcr.io/ggml-org/llama.cpp:server")
        assert service["volumes"] == [f"{store.resolve()}:/models:ro"]
        assert service["command"][:2] == ["-m", f"/models/m/q4/{version}/model.safetensors"]
        assert "/health" in service["healthcheck"]["test"][-1]
    assert doc["services"]["lb"]["depends_on"] == {f"replica-{i}": {"condition": "service_healthy"} for i in (1, 2, 3)}
    nginx = (out / "nginx.conf").read_text()
    assert all(f"server replica-{i}:8080" in nginx for i in (1, 2, 3))
    assert nginx.count("{") == nginx.count("}")


def test_compose_from_s3_fetches_and_checks_before_serving(s3_store, tmp_path, compose_schema):
    store_url = s3_store
    version = _publish_with_profiles(store_url, tmp_path)
    out = tmp_path / "deploy"
    assert _cli("deploy", "m/q4", str(out), "--replicas", "2", "--storage", store_url).returncode == 0
    doc = yaml.safe_load((out / "docker-compose.yml").read_text())
    _validate(doc, compose_schema)
    fetch = doc["services"]["fetch"]
    assert f"{store_url}/m/q4/{version}" in fetch["command"][0] and "sha256sum -c" in fetch["command"][0]
    sums = (out / "SHA256SUMS").read_text().splitlines()
    manifest = json.loads(_cli("show", f"m/q4@{version}", "--storage", store_url, "--json").stdout)
    assert len(sums) == 2 and manifest["model"] == "m"
    assert doc["services"]["replica-1"]["depends_on"] == {"fetch": {"condition": "service_completed_successfully"}}
    assert "weights" in doc["volumes"]


def test_deploy_names_the_profiles_when_asked_for_a_missing_one(tmp_path):
    store = tmp_path / "store"
    _publish_with_profiles(str(store), tmp_path)
    bad = _cli("deploy", "m/q4", str(tmp_path / "d"), "--profile", "nope", "--storage", str(store))
    assert bad.returncode == 2 and "profiles: llamacpp-q4_k_m-cpu" in bad.stderr


def test_cpu_replicas_are_given_their_own_cores_or_warned_that_they_share(tmp_path, compose_schema):
    """llama-server computes on every core of its host by default, so replicas sharing one host
    oversubscribe it: deploy says so (a note and a comment) unless given --cpus-per-replica, which
    becomes Compose's `cpus` and the server's thread flags; nonsense is refused in one line."""
    store = tmp_path / "store"
    _publish_with_profiles(str(store), tmp_path)
    shared = _cli("deploy", "m/q4", str(tmp_path / "shared"), "--replicas", "2", "--storage", str(store))
    assert shared.returncode == 0 and "note: each of the 2 replicas computes on every core" in shared.stderr
    assert "share the host's cores" in (tmp_path / "shared" / "docker-compose.yml").read_text()
    own = _cli("deploy", "m/q4", str(tmp_path / "own"), "--replicas", "2", "--cpus-per-replica", "3",
               "--storage", str(store))
    assert own.returncode == 0 and "note:" not in own.stderr, own.stderr
    text = (tmp_path / "own" / "docker-compose.yml").read_text()
    doc = yaml.safe_load(text)
    _validate(doc, compose_schema)
    assert "share the host's cores" not in text
    for service in (doc["services"]["replica-1"], doc["services"]["replica-2"]):
        command = service["command"]
        assert service["cpus"] == 3
        assert command[command.index("--threads") + 1] == command[command.index("--threads-batch") + 1] == "3"
    for bad in ("0", "-2"):
        refused = _cli("deploy", "m/q4", str(tmp_path / f"bad{bad}"), "--cpus-per-replica", bad,
                       "--storage", str(store))
        assert refused.returncode == 2 and "--cpus-per-replica must be at least 1" in refused.stderr
        assert "Traceback" not in refused.stderr and not (tmp_path / f"bad{bad}").exists()
    from pipeline.errors import StorageError
    from pipeline.publishing.deploy import compose

    vllm = {"name": "vllm-h100", "engine": "vllm", "command": "vllm serve /store/m/q4/v --port 8000"}
    with pytest.raises(StorageError, match="for CPU engines; vLLM replicas compute on GPUs"):
        compose(manifest=_manifest(engines=("vllm",), cc=9.0), storage_url="/store", location="/store/m/q4/v",
                profile=vllm, replicas=2, local_root="/store", cpus_per_replica=4)


EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "example"


def test_committed_example_is_a_valid_deployment(compose_schema):
    """deploy/example (the demo's GGUF Q4_K_M, generated by `modelbuild deploy`) stays valid."""
    doc = yaml.safe_load((EXAMPLE / "docker-compose.yml").read_text())
    _validate(doc, compose_schema)
    replicas = [s for name, s in doc["services"].items() if name.startswith("replica-")]
    assert len(replicas) == 3 and all(s["volumes"] == ["/mnt/models:/models:ro"] for s in replicas)
    assert all(s["command"][1].startswith("/models/smollm2-135m-instruct/gguf-q4_k_m/") for s in replicas)
    nginx = (EXAMPLE / "nginx.conf").read_text()
    assert [f"replica-{i}" in nginx for i in (1, 2, 3)] == [True] * 3
