"""`modelbuild watch`: a changed source is flagged and `--rebuild` rebuilds it; a Hub that cannot
be asked is "could not check", never "nothing new".

The Hub side runs against a local stand-in, not the Hub: a stdlib HTTP server on loopback that
answers the three Hub API routes `watch` uses — `GET /api/models/{repo}/revision/{revision}`
(`HfApi.model_info`), `GET /api/models/{repo}/refs` (`list_repo_refs`) and
`GET /api/models?author=...` (`list_models`) — with the JSON fields and error headers
(`X-Error-Code: RevisionNotFound`) the real Hub sends; `HF_ENDPOINT` points huggingface_hub at it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import REPO


class HubStandIn:
    """Serves ``commits[(repo, revision)]`` as the Hub's model-info JSON."""

    def __init__(self):
        self.commits: dict[tuple[str, str], str] = {}
        self.tags: dict[str, list[str]] = {}  # repo -> tag names
        self.repos: list[str] = []  # every repo id, for list_models(author=...)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                from urllib.parse import parse_qs, urlsplit

                url = urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if parts == ["api", "models"]:
                    author = parse_qs(url.query).get("author", [""])[0]
                    return self._send(200, [{"id": r, "modelId": r} for r in stand_in.repos
                                            if r.split("/")[0] == author])
                if len(parts) == 5 and parts[:2] == ["api", "models"] and parts[4] == "refs":
                    repo = f"{parts[2]}/{parts[3]}"
                    sha = stand_in.commits.get((repo, "main"), "0" * 40)
                    return self._send(200, {
                        "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": sha}],
                        "converts": [],
                        "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": sha}
                                 for t in stand_in.tags.get(repo, [])],
                    })
                if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
                    repo, revision = f"{parts[2]}/{parts[3]}", parts[5]
                    sha = stand_in.commits.get((repo, revision))
                    if sha is not None:
                        return self._send(200, {"id": repo, "modelId": repo, "sha": sha, "private": False})
                    known = any(r == repo for r, _ in stand_in.commits)
                    code = "RevisionNotFound" if known else "RepoNotFound"
                    return self._send(404, {"error": f"{code}: {repo}@{revision}"}, {"X-Error-Code": code})
                self._send(404, {"error": "not served by this stand-in"})

            def _send(self, status, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def hub():
    stand_in = HubStandIn()
    yield stand_in
    stand_in.close()


def _watch(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "watch", *map(str, args)], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600)


def test_local_source_change_is_flagged_and_rebuilt(recipe_factory, tiny_model, dirs, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    recipe = recipe_factory(source=f"source:\n  kind: local\n  path: {model}\n")
    where = ("--cache-dir", dirs["cache"], "--storage", dirs["storage"])
    first = _watch(recipe, *where)
    assert first.returncode == 10 and "no lock file" in first.stdout
    assert subprocess.run([sys.executable, "-m", "pipeline", "lock", str(recipe), "--cache-dir", str(dirs["cache"])],
                          cwd=REPO, capture_output=True).returncode == 0
    assert _watch(recipe, *where).returncode == 0
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 50000.0}))  # a new upstream release
    stale = _watch(recipe, *where, "--json")
    assert stale.returncode == 10
    [report] = json.loads(stale.stdout)
    assert report["status"] == "stale" and any(c.startswith("source.files") for c in report["changes"])
    rebuilt = _watch(recipe, *where, "--rebuild")
    assert rebuilt.returncode == 11, rebuilt.stdout + rebuilt.stderr[-2000:]
    assert "→ rebuilt" in rebuilt.stdout
    assert _watch(recipe, *where).returncode == 0  # the rebuild refreshed the lock


def test_hub_branch_moved_deleted_unreachable_or_offline(recipe_factory, tiny_model, dirs, tmp_path, hub):
    from tests.sources.test_sources import populate_hub_cache

    old, new = "a" * 40, "b" * 40
    populate_hub_cache(tmp_path / "hub", "acme/tiny", tiny_model, old)
    recipe = recipe_factory(source="source:\n  kind: hub\n  repo: acme/tiny\n  revision: main\n")
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    locked = subprocess.run([sys.executable, "-m", "pipeline", "lock", str(recipe), "--cache-dir", str(dirs["cache"])],
                            cwd=REPO, env={**os.environ, **offline}, capture_output=True, text=True)
    assert locked.returncode == 0, locked.stderr
    online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
              "HF_HUB_DISABLE_TELEMETRY": "1"}
    hub.commits[("acme/tiny", "main")] = old
    assert _watch(recipe, env=online).returncode == 0
    hub.commits[("acme/tiny", "main")] = new
    moved = _watch(recipe, env=online)
    assert moved.returncode == 10 and f"source.commit: {old[:12]}… → {new[:12]}…" in moved.stdout
    hub.commits = {("acme/tiny", "release"): new}  # main was deleted upstream
    gone = _watch(recipe, env=online)
    assert gone.returncode == 12 and "revision 'main' does not exist" in gone.stdout
    down = _watch(recipe, env={**online, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert down.returncode == 12 and "cannot reach the Hub" in down.stdout
    assert "HF_HUB_OFFLINE is set" in _watch(recipe, env=offline).stdout


def test_watch_rules_report_new_tags_and_repos_until_locked(recipe_factory, tiny_model, dirs, tmp_path, hub):
    """New upstream releases (a tag, a matching repo of the organisation) are reported, rebuild
    nothing, and stop being new once `lock` acknowledges them."""
    from tests.sources.test_sources import populate_hub_cache

    commit = "c" * 40
    populate_hub_cache(tmp_path / "hub", "acme/tiny", tiny_model, commit)
    hub.commits[("acme/tiny", "main")] = commit
    hub.tags["acme/tiny"] = ["v1.0"]
    hub.repos = ["acme/tiny", "acme/tiny-v1", "acme/other", "someone/tiny-v9"]
    rules = "watch:\n  tags: true\n  new_repos:\n    - {author: acme, pattern: 'tiny-v*'}\n"
    recipe = recipe_factory(source="source:\n  kind: hub\n  repo: acme/tiny\n  revision: main\n", extra=rules)
    online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
              "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    lock = subprocess.run([sys.executable, "-m", "pipeline", "lock", str(recipe), "--cache-dir", str(dirs["cache"])],
                          cwd=REPO, env={**os.environ, **online}, capture_output=True, text=True)
    assert lock.returncode == 0, lock.stderr[-2000:]
    assert json.loads(recipe.with_name("recipe.lock.json").read_text())["releases"] == {
        "tags": ["v1.0"], "repos": ["acme/tiny-v1"]}
    assert _watch(recipe, env=online).returncode == 0
    hub.tags["acme/tiny"].append("v2.0")
    hub.repos.append("acme/tiny-v2")
    found = _watch(recipe, "--rebuild", "--cache-dir", dirs["cache"], "--storage", dirs["storage"], env=online)
    assert found.returncode == 10, found.stdout + found.stderr[-2000:]
    assert "new release:" in found.stdout and "new tag: v2.0" in found.stdout and "new repo: acme/tiny-v2" in found.stdout
    assert "rebuilt" not in found.stdout
    assert subprocess.run([sys.executable, "-m", "pipeline", "lock", str(recipe), "--cache-dir", str(dirs["cache"])],
                          cwd=REPO, env={**os.environ, **online}, capture_output=True).returncode == 0
    assert _watch(recipe, env=online).returncode == 0


def test_watch_rules_need_a_hub_source(cli, recipe_factory):
    code, _, err = cli("validate", recipe_factory(extra="watch:\n  tags: true\n"))
    assert code == 2 and "watch rules (tags, new_repos) need a Hub source" in err


def test_exit_codes_rank_the_most_urgent():
    from pathlib import Path

    from pipeline.run.watch import Check, exit_code

    stale, unknown = Check(Path("a"), "stale"), Check(Path("b"), "unknown")
    assert exit_code([Check(Path("a"), "current")], 0, 0) == 0
    assert exit_code([stale], 0, 0) == 10 and exit_code([stale], 1, 0) == 11
    assert exit_code([stale, unknown], 1, 0) == 12 and exit_code([stale, unknown], 0, 1) == 13


def test_a_watch_rule_that_matches_nothing(recipe_factory, tiny_model, dirs, tmp_path, hub):
    """A rule whose author/pattern matches no repository is a mistake, not "nothing new": `lock`
    refuses it in one line, and `watch` (the repos renamed upstream after the lock) exits with its
    "could not check" code naming the rule."""
    from tests.sources.test_sources import populate_hub_cache

    commit = "d" * 40
    populate_hub_cache(tmp_path / "hub", "acme/tiny", tiny_model, commit)
    hub.commits[("acme/tiny", "main")] = commit
    hub.repos = ["acme/tiny"]
    source = "source:\n  kind: hub\n  repo: acme/tiny\n  revision: main\n"
    online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
              "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}

    def lock(recipe):
        return subprocess.run([sys.executable, "-m", "pipeline", "lock", str(recipe), "--cache-dir",
                               str(dirs["cache"])], cwd=REPO, env={**os.environ, **online}, capture_output=True,
                              text=True)

    typo = recipe_factory(source=source, extra="watch:\n  new_repos:\n    - {author: acme, pattern: 'tnii-*'}\n")
    refused = lock(typo)
    assert refused.returncode == 2 and "watch.new_repos.0" in refused.stderr, refused.stderr
    assert "matches no repository" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    good = recipe_factory(source=source, extra="watch:\n  new_repos:\n    - {author: acme, pattern: 'tiny*'}\n")
    assert lock(good).returncode == 0
    assert _watch(good, env=online).returncode == 0
    hub.repos = ["acme/renamed"]
    gone = _watch(good, env=online)
    assert gone.returncode == 12 and "matches no repository" in gone.stdout, gone.stdout
