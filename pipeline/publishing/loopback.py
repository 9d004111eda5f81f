"""A generated llama.cpp deployment (``deploy``'s ``docker-compose.yml`` and ``nginx.conf``) run on
this machine without Docker: each replica service's command as a local ``llama-server`` process,
the generated nginx configuration under Debian's nginx, Compose's service names mapped to loopback
ports. Nothing else of the generated files is changed, so what serves here is what the files say:
the replicas' arguments, the balancing, the retries, the failure marking.

For an S3 store the compose file's ``fetch`` service copies the version and checks it with
``sha256sum -c SHA256SUMS``; here the version is pulled (every file checked as it lands) into the
folder the replicas read, and the same generated ``SHA256SUMS`` check is run on it.

Used to prove a deployment serves, and by ``benchmarks/balancer.py`` to measure it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.errors import StageError

# The folder Compose mounts the store at (``deploy.MOUNT``), as the replicas' arguments name it.
MOUNT = "/models"
# Debian installs nginx in /usr/sbin, which is not on every user's PATH.
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Replica:
    name: str
    argv: list[str]
    port: int
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL, as a crashed or OOM-killed replica dies (no graceful drain)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def _log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tasks_served(self) -> int:
        """Completions this replica has started since it was first started (from its own log)."""
        return self._log().count("processing task")

    def in_flight(self) -> int:
        """Completions it has started and not finished (its log's launches less its releases)."""
        log = self._log()
        return log.count("processing task") - log.count("stop processing")


@dataclass
class Deployment:
    folder: Path
    replicas: list[Replica]
    port: int  # the load balancer's
    nginx: subprocess.Popen | None = None
    conf: Path = field(default_factory=Path)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for r in self.replicas:
            r.kill()
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.terminate()
            try:
                self.nginx.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nginx.kill()


def replica_commands(compose_yml: str, llama_server: str, models_root: Path) -> list[tuple[str, list[str]]]:
    """(service name, argv) of every replica of a generated llama.cpp deployment, its files read
    from ``models_root`` where Compose would mount them.

    Raises:
        StageError: not a llama.cpp deployment (only llama.cpp runs on this machine's CPU).
    """
    services = yaml.safe_load(compose_yml)["services"]
    out = []
    for name, service in services.items():
        if not name.startswith("replica-"):
            continue
        if "llama.cpp" not in service["image"] or "entrypoint" in service:
            raise StageError(f"{name} runs {service['image']}: only llama.cpp deployments run here without Docker")
        args = [str(models_root) + a[len(MOUNT):] if a.startswith(MOUNT + "/") else a for a in service["command"]]
        out.append((name, [llama_server, *args]))
    return out


def _arg(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def nginx_config(text: str, ports: dict[str, int], listen: int) -> str:
    """The generated configuration with Compose's names resolved to loopback: ``replica-N:PORT``
    becomes ``127.0.0.1:<its port>``, ``listen 80`` becomes ``listen 127.0.0.1:<listen>``."""
    def upstream(m: re.Match) -> str:
        return f"server 127.0.0.1:{ports[m.group(1)]}"

    text = re.sub(r"server (replica-\d+):\d+", upstream, text)
    return re.sub(r"listen 80;", f"listen 127.0.0.1:{listen};", text)


def start(folder: Path, *, models_root: Path, llama_server: str, nginx: str = NGINX,
          ready_timeout: float = 120.0) -> Deployment:
    """Start the deployment generated in ``folder``; returns once every replica answers
    ``/health`` and nginx accepts connections (or raises after ``ready_timeout`` seconds)."""
    run = folder / "loopback"
    run.mkdir(exist_ok=True)
    replicas = []
    for name, argv in replica_commands((folder / "docker-compose.yml").read_text(), llama_server, models_root):
        port = free_port()
        argv = _arg(_arg(argv, "--host", "127.0.0.1"), "--port", str(port))
        replicas.append(Replica(name, argv, port, run / f"{name}.log"))
    dep = Deployment(folder, replicas, free_port())
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            wait_healthy(r, ready_timeout)
        dep.conf = run / "nginx.conf"
        dep.conf.write_text(nginx_config((folder / "nginx.conf").read_text(), {r.name: r.port for r in replicas},
                                         dep.port))
        directives = f"daemon off; pid {run / 'nginx.pid'}; error_log {run / 'nginx-error.log'};"
        dep.nginx = subprocess.Popen([nginx, "-p", str(run), "-c", str(dep.conf), "-g", directives],
                                     stdout=subprocess.DEVNULL, stderr=(run / "nginx.out").open("ab"))
        _wait_port(dep.port, ready_timeout, dep.nginx, run / "nginx.out")
    except BaseException:
        dep.stop()
        raise
    return dep


def wait_healthy(replica: Replica, timeout: float) -> None:
    """Until the replica's ``/health`` says ok (llama-server answers 503 while loading)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if replica.proc is not None and replica.proc.poll() is not None:
            raise StageError(f"{replica.name} exited ({replica.proc.returncode}): "
                             f"{replica.log.read_text(errors='replace')[-400:]}")
        try:
            status, _body = request(replica.port, "GET", "/health", None, timeout=5)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise StageError(f"{replica.name} did not become healthy within {timeout:g} s")


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StageError(f"nginx exited ({proc.returncode}): {log.read_text(errors='replace')[-400:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise StageError(f"nginx did not listen on {port} within {timeout:g} s")


def request(port: int, method: str, path: str, body: dict | None, timeout: float = 120) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def verify_fetched(folder: Path, sha256sums: Path) -> None:
    """The compose file's fetch check, as it runs there: ``sha256sum -c`` in the version folder.

    Raises:
        StageError: a file differs from the generated ``SHA256SUMS`` (names it).
    """
    done = subprocess.run([shutil.which("sha256sum") or "sha256sum", "-c", str(sha256sums.resolve())], cwd=folder,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise StageError(f"fetched files do not match SHA256SUMS: {done.stdout.strip()[-300:]}")


@dataclass
class Load:
    """What a bounded request load got back."""

    ok: int = 0
    failed: int = 0
    statuses: dict[int | str, int] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)  # each successful request's latency

    def percentile(self, p: float) -> float:
        s = sorted(self.seconds)
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] if s else float("nan")


def send_load(port: int, body: dict, *, requests: int, concurrency: int, after_each=None,
              path: str = "/completion") -> Load:
    """``requests`` POSTs of ``body`` to ``path``, ``concurrency`` at a time; ``after_each(done)``
    is called (under a lock, in order) once each request has finished, with how many have."""
    import threading

    result = Load()
    lock = threading.Lock()
    todo = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                if next(todo, None) is None:
                    return
            began = time.monotonic()
            status: int | str
            try:
                status, _ = request(port, "POST", path, body)
            except OSError as e:  # reset, refused, timed out: a failure the client saw
                status = type(e).__name__
            took = time.monotonic() - began
            with lock:
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 200:
                    result.ok += 1
                    result.seconds.append(took)
                else:
                    result.failed += 1
                if after_each is not None:
                    after_each(result.ok + result.failed)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result
