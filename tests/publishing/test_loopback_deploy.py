"""The deployment `deploy` generates really serves: its nginx configuration under Debian's nginx in
front of the replicas its compose file describes (llama-server processes on loopback, no Docker),
with a published GGUF read from a filesystem store and pulled from S3. One replica is killed in
the middle of a request load: every request still succeeds (nginx passes it to the next replica),
and the restarted replica rejoins. Each wait is for an event (a replica healthy, a request done,
a log line), bounded only so a broken build fails instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.publishing import loopback
from tests.backends.test_llamacpp import gguf_recipe
from tests.conftest import REPO

NGINX = loopback.NGINX
BODY = {"prompt": "The capital of France is", "n_predict": 48, "temperature": 0, "cache_prompt": False}


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=900)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_smol, wikitext):
    """A Q8_0 GGUF of the tiny model published in a filesystem store, and llama-server."""
    from pipeline.toolchains import llamacpp

    if not Path(NGINX).is_file():
        pytest.fail("nginx is not installed (bash .ci/setup installs Debian's nginx-light)")
    root = tmp_path_factory.mktemp("lb")
    recipe = gguf_recipe(root, tiny_smol, wikitext, """\
        - name: gguf-q8
          backend: llamacpp
          type: Q8_0
        """, calibration=False)
    done = _cli("run", recipe, "--cache-dir", root / "cache", "--storage", root / "store")
    assert done.returncode == 0, done.stderr
    return {"root": root, "recipe": recipe, "store": root / "store",
            "llama_server": str(llamacpp.find().tool("llama-server"))}


def _deploy(served, out: Path, storage, replicas: int) -> None:
    done = _cli("store", "deploy", "tiny-smol/gguf-q8", out, "--replicas", replicas, "--engine", "llamacpp",
                "--storage", storage)
    assert done.returncode == 0, done.stderr


def test_the_balancer_serves_through_a_killed_replica_and_the_restart_rejoins(served, tmp_path):
    out = tmp_path / "deploy"
    _deploy(served, out, served["store"], 3)
    with loopback.start(out, models_root=served["store"], llama_server=served["llama_server"], nginx=NGINX) as dep:
        victim = dep.replicas[0]
        served_before_kill = []

        def kill_midway(done: int) -> None:
            # Killed from the 20th answer on, while it is generating: its requests in flight are
            # lost with it, and nginx must send them to another replica.
            if done >= 20 and not served_before_kill and victim.in_flight() > 0:
                served_before_kill.append(victim.tasks_served())
                victim.kill()

        load = loopback.send_load(dep.port, BODY, requests=60, concurrency=6, after_each=kill_midway)
        assert served_before_kill, "the replica was never caught with a request in flight"
        assert load.failed == 0 and load.ok == 60, load.statuses
        # The others took the rest.
        assert sum(r.tasks_served() for r in dep.replicas[1:]) >= 60 - served_before_kill[0]

        # Restarted on its port, it rejoins once nginx tries it again (fail_timeout after its failures).
        victim.start()
        loopback.wait_healthy(victim, 120)
        before = victim.tasks_served()
        deadline = time.monotonic() + 120
        while victim.tasks_served() == before and time.monotonic() < deadline:
            assert loopback.request(dep.port, "POST", "/completion", BODY)[0] == 200
        assert victim.tasks_served() > before, "the restarted replica was never sent a request"


def test_a_deployment_from_s3_fetches_checks_and_serves(served, tmp_path, s3_store):
    push = _cli("run", served["recipe"], "--cache-dir", served["root"] / "cache", "--storage", s3_store)
    assert push.returncode == 0, push.stderr
    out = tmp_path / "deploy"
    _deploy(served, out, s3_store, 2)
    compose = (out / "docker-compose.yml").read_text()
    assert "fetch:" in compose and (out / "SHA256SUMS").is_file()
    # What the fetch service does: the version into the folder the replicas read, checked by the
    # generated SHA256SUMS.
    shown = json.loads(_cli("store", "show", "tiny-smol/gguf-q8", "--storage", s3_store, "--json").stdout)
    rel = f"tiny-smol/gguf-q8/{shown['channels']['latest']}"
    models = tmp_path / "models"
    pulled = _cli("store", "pull", "tiny-smol/gguf-q8", models / rel, "--storage", s3_store)
    assert pulled.returncode == 0, pulled.stderr
    loopback.verify_fetched(models / rel, out / "SHA256SUMS")
    with loopback.start(out, models_root=models, llama_server=served["llama_server"], nginx=NGINX) as dep:
        load = loopback.send_load(dep.port, BODY, requests=10, concurrency=2)
        assert load.ok == 10 and load.failed == 0, load.statuses
        assert all(r.tasks_served() > 0 for r in dep.replicas)
    # A fetched file that differs is refused by the same check.
    gguf = next((models / rel).glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))
    with pytest.raises(Exception, match="do not match SHA256SUMS"):
        loopback.verify_fetched(models / rel, out / "SHA256SUMS")
