"""The generated load-balanced deployment under load, on this machine without Docker
(``pipeline.publishing.loopback``): one replica direct vs N replicas through the generated nginx,
as generated without and with ``--cpus-per-replica`` (each llama-server then computes on that many
threads instead of every core), and the latter with one replica killed (SIGKILL) once a fifth of
the requests are answered, while it is generating. Prints requests answered, failures, p50/p99
latency and throughput per case.

    python benchmarks/balancer.py --storage artifacts [--ref smollm2-135m-instruct/gguf-q4_k_m]
        [--replicas 3] [--cpus-per-replica K] [--requests 120] [--concurrency 6] [--n-predict 32]

The store must hold a published GGUF variant (the demo's, by default). K defaults to the
machine's cores divided among the replicas (at least 1). On a 2-core machine the replicas share
the same cores, so the balancer adds no throughput here: what it is measured for is the cost of
the hop, of replicas that oversubscribe their host, and what a killed replica costs the clients.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO

sys.path.insert(0, str(REPO))

from pipeline.publishing import loopback  # noqa: E402
from pipeline.toolchains import llamacpp  # noqa: E402


def deploy(storage: str, ref: str, replicas: int, out: Path, cpus: int | None = None) -> None:
    cores = ["--cpus-per-replica", str(cpus)] if cpus else []
    subprocess.run([sys.executable, "-m", "pipeline", "store", "deploy", ref, str(out), "--replicas", str(replicas),
                    "--engine", "llamacpp", "--storage", storage, *cores], cwd=REPO, check=True, capture_output=True)


def case(name: str, port: int, body: dict, args, after_each=None) -> dict:
    began = time.monotonic()
    load = loopback.send_load(port, body, requests=args.requests, concurrency=args.concurrency, after_each=after_each)
    wall = time.monotonic() - began
    return {"case": name, "ok": load.ok, "failed": load.failed, "p50": load.percentile(50),
            "p99": load.percentile(99), "wall": wall, "rps": load.ok / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", default=str(REPO / "artifacts"))
    ap.add_argument("--ref", default="smollm2-135m-instruct/gguf-q4_k_m")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--cpus-per-replica", type=int, default=None)
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--n-predict", type=int, default=32)
    args = ap.parse_args()
    cpus = args.cpus_per_replica or max(1, (os.cpu_count() or 1) // args.replicas)
    body = {"prompt": "The capital of France is", "n_predict": args.n_predict, "temperature": 0, "cache_prompt": False}
    server = str(llamacpp.find().tool("llama-server"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        one, shared, own = Path(tmp) / "one", Path(tmp) / "shared", Path(tmp) / "own"
        deploy(args.storage, args.ref, 1, one)
        deploy(args.storage, args.ref, args.replicas, shared)
        deploy(args.storage, args.ref, args.replicas, own, cpus)
        root = Path(args.storage)
        with loopback.start(one, models_root=root, llama_server=server) as dep:
            rows.append(case("one replica, direct (all cores)", dep.replicas[0].port, body, args))
        with loopback.start(shared, models_root=root, llama_server=server) as dep:
            rows.append(case(f"{args.replicas} replicas through nginx, all cores each", dep.port, body, args))
        with loopback.start(own, models_root=root, llama_server=server) as dep:
            rows.append(case(f"{args.replicas} replicas through nginx, {cpus} thread(s) each", dep.port, body, args))
        with loopback.start(own, models_root=root, llama_server=server) as dep:
            victim, killed = dep.replicas[0], []

            def kill(done: int) -> None:
                if done >= args.requests // 5 and not killed and victim.in_flight() > 0:
                    killed.append(victim.in_flight())
                    victim.kill()

            row = case(f"{args.replicas} replicas through nginx, {cpus} thread(s) each, one killed", dep.port, body,
                       args, kill)
            row["case"] += f" ({killed[0]} in flight)" if killed else " (never caught generating: not killed)"
            rows.append(row)
    print(f"{args.ref}: {args.requests} requests of {args.n_predict} tokens, {args.concurrency} at a time")
    print("| case | answered | failed | p50 | p99 | wall | requests/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['ok']} | {r['failed']} | {r['p50'] * 1e3:.0f} ms | {r['p99'] * 1e3:.0f} ms "
              f"| {r['wall']:.1f} s | {r['rps']:.2f} |")
    direct = rows[0]
    for balanced in rows[1:3]:
        print(f"{balanced['case']} / direct: p50 {balanced['p50'] / direct['p50']:.2f}×, "
              f"throughput {balanced['rps'] / direct['rps']:.2f}×")


if __name__ == "__main__":
    main()
