"""Load benchmark: 50 concurrent clients against the real service on loopback.

Starts the API (uvicorn, its own process) and one training worker (`sbora
worker`) on a scratch data directory, prepares a dataset and one adapter, then
for --duration seconds 50 clients mix: POST /jobs (queued behind the one
worker), GET /jobs/{id}, GET /adapters, adapter downloads and short /generate
calls. Each client pauses between requests (--think, exponential, mean 1 s),
as people and pollers do; --think 0 saturates the server and measures its
capacity instead. Afterwards it waits for every submitted job to finish.

The first --warmup seconds (5) run the same load but their latencies are
reported apart (`p99_ms_warmup`): they hold the clients' connection setup and
the server's first burst, which would otherwise make up the whole 1% tail.
Errors count over the whole run.

The base model is a tiny LLaMA built from a config (so that the queued jobs
finish in minutes on a CPU); `--default-model` uses SmolLM2-135M instead.

    .venv/bin/python bench/load.py [--duration 60] [--clients 50] [--production [--s3]]

`--s3` keeps the artifacts in an S3-compatible object store (moto's standalone
server, a process of its own on loopback) instead of a local directory.

Writes bench/results/load.json (load-production.json, load-production-s3.json):
`errors`, `p99_ms` per route, `jobs_completed`/`jobs_submitted`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MIX = [("GET /jobs/{id}", 35), ("GET /adapters", 25), ("GET /adapters/{id}", 15), ("POST /generate", 15),
       ("POST /jobs", 10)]
GENERATION_ROUTES = {"POST /generate"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dataset_bytes() -> bytes:
    colours = ["red", "green", "blue", "gold"]
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"Item {i}: which colour?"},
                                            {"role": "assistant", "content": f"The colour is {colours[i % 4]}."}]})
                   + "\n" for i in range(32)).encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run_load(url: str, headers: dict, model: str, dataset_id: str, adapter_id: str, job_ids: list[str],
                   duration: float, clients: int, max_jobs: int, mix: list, think: float,
                   warmup: float) -> tuple[dict, dict, dict, list[str]]:
    latencies: dict[str, list[float]] = defaultdict(list)
    warming: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    submitted: list[str] = []
    routes, weights = zip(*mix, strict=True)
    measured_from = time.monotonic() + warmup
    deadline = measured_from + duration
    job_body = {"base_model": model, "training_dataset_id": dataset_id, "method": {"r": 4, "alpha": 8},
                "hyperparameters": {"max_steps": 3, "batch_size": 4, "max_seq_len": 128}}

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
            while time.monotonic() < deadline:
                if think > 0:
                    await asyncio.sleep(rng.expovariate(1 / think))
                route = rng.choices(routes, weights)[0]
                if route == "POST /jobs" and len(submitted) >= max_jobs:
                    route = "GET /jobs/{id}"
                start, started_at = time.perf_counter(), time.monotonic()
                if route == "GET /jobs/{id}":
                    response = await http.get(f"/jobs/{rng.choice(job_ids + submitted)}")
                elif route == "GET /adapters":
                    response = await http.get("/adapters")
                elif route == "GET /adapters/{id}":
                    response = await http.get(f"/adapters/{adapter_id}")
                elif route == "POST /generate":
                    response = await http.post("/generate", json={"prompt": "Item 3: which colour?",
                                                                  "adapter_id": adapter_id, "max_new_tokens": 8})
                else:
                    response = await http.post("/jobs", json=job_body)
                    if response.status_code == 201:
                        submitted.append(response.json()["id"])
                (latencies if started_at >= measured_from else warming)[route].append(time.perf_counter() - start)
                expected = 201 if route == "POST /jobs" else 200
                if response.status_code != expected:
                    errors[route] += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, warming, errors, submitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=60, help="measured seconds, after the warm-up")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of load before the measured window")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--max-jobs", type=int, default=40, help="cap on jobs submitted during the run")
    parser.add_argument("--default-model", action="store_true")
    parser.add_argument("--production", action="store_true", help="PostgreSQL + Redis on this machine")
    parser.add_argument("--s3", action="store_true", help="artifacts in an S3-compatible store (moto's server)")
    parser.add_argument("--no-generate", action="store_true", help="leave /generate out of the mix")
    parser.add_argument("--think", type=float, default=1.0,
                        help="mean pause of a client between requests, in seconds (exponential); 0 saturates")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        if args.default_model:
            model, model_source = "smollm2-135m-instruct", "smollm2-135m-instruct"
        else:
            from sbora_core.testing import build_tiny_model

            model_source = str(build_tiny_model(tmp / "tiny-llama"))
            model = "tiny-llama"
        port = free_port()
        env = {**os.environ, "SBORA_DATA_DIR": str(tmp / "data"), "SBORA_MODELS": json.dumps([model_source]),
               "SBORA_MAX_CONCURRENT_JOBS": "100000", "SBORA_TRAIN_QUEUE": f"load-{port}"}
        flavour = "embedded (SQLite + filesystem broker)"
        if args.production:
            import psycopg

            db = f"sbora_load_{port}"
            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{db}"')
            env["SBORA_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
            env["SBORA_BROKER_URL"] = "redis://127.0.0.1:6379/0"
            flavour = "production (PostgreSQL + Redis)"
        store = start_object_store(tmp, env) if args.s3 else None
        if store is not None:
            flavour += " + S3 artifact store"
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port",
                                str(port), "--log-level", "warning"], cwd=ROOT, env=env, start_new_session=True)
        # On one machine the training worker would take every core from the API; in production it has
        # a GPU machine of its own. Give it one core and one thread here.
        worker_cmd = [sys.executable, "-m", "sbora_cli.main", "worker"]
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            worker_cmd = ["taskset", "-c", str((os.cpu_count() or 2) - 1), *worker_cmd]
        worker = subprocess.Popen(worker_cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            results = drive(args, f"http://127.0.0.1:{port}", env, model, flavour)
        finally:
            for proc in (api, worker):
                os.killpg(proc.pid, signal.SIGTERM)
            for proc in (api, worker):
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            if store is not None:
                store.terminate()
                store.wait()
            if args.production:
                import psycopg

                with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "load" + ("-production" if args.production else "") + ("-s3" if args.s3 else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    report(results)


def start_object_store(tmp: Path, env: dict) -> subprocess.Popen:
    """moto's S3 server on a free port, a bucket in it, and the service's settings pointing there."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="load",
                         aws_secret_access_key="load").create_bucket(Bucket="sbora-load")
            break
        except Exception:
            time.sleep(0.2)
    env.update({"SBORA_ARTIFACT_URL": "s3://sbora-load/artifacts", "SBORA_S3_ENDPOINT_URL": endpoint,
                "SBORA_S3_ACCESS_KEY_ID": "load", "SBORA_S3_SECRET_ACCESS_KEY": "load"})
    return proc


def drive(args, url: str, env: dict, model: str, flavour: str) -> dict:  # noqa: PLR0915
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.3)
    key = subprocess.run([sys.executable, "-m", "sbora_cli.main", "keys", "create", "--tenant", "load"], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    http = httpx.Client(base_url=url, headers=headers, timeout=600)
    dataset_id = http.post("/datasets", files={"file": ("d.jsonl", dataset_bytes())}).raise_for_status().json()["id"]
    body = {"base_model": model, "training_dataset_id": dataset_id, "method": {"r": 4, "alpha": 8},
            "hyperparameters": {"max_steps": 3, "batch_size": 4, "max_seq_len": 128}}
    first = http.post("/jobs", json=body).raise_for_status().json()["id"]
    while (job := http.get(f"/jobs/{first}").json())["status"] not in ("succeeded", "failed"):
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    adapter_id = job["adapter_id"]
    http.post("/generate", json={"prompt": "warm up", "adapter_id": adapter_id, "max_new_tokens": 2}).raise_for_status()

    print(f"{args.clients} clients for {args.warmup:.0f} + {args.duration:.0f} s ...", file=sys.stderr, flush=True)
    mix = [(r, w) for r, w in MIX if not (args.no_generate and r in GENERATION_ROUTES)]
    latencies, warming, errors, submitted = asyncio.run(run_load(
        url, headers, model, dataset_id, adapter_id, [first], args.duration, args.clients, args.max_jobs, mix,
        args.think, args.warmup))
    print(f"waiting for {len(submitted)} submitted jobs ...", file=sys.stderr, flush=True)
    drain_deadline = time.monotonic() + 1800
    statuses: dict[str, str] = {}
    while time.monotonic() < drain_deadline:
        statuses = {j: http.get(f"/jobs/{j}").json()["status"] for j in submitted}
        if all(s in ("succeeded", "failed", "cancelled") for s in statuses.values()):
            break
        time.sleep(2)
    requests = sum(len(v) for v in latencies.values())
    return {
        "setup": {"clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup,
                  "think_s": args.think, "model": model,
                  "stack": flavour,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "mix": dict(mix)},
        "requests": requests,
        "throughput_rps": requests / args.duration,
        "errors": sum(errors.values()),
        "errors_by_route": dict(errors),
        "p50_ms": {r: 1e3 * percentile(v, 0.50) for r, v in latencies.items()},
        "p99_ms": {r: 1e3 * percentile(v, 0.99) for r, v in latencies.items()},
        "count": {r: len(v) for r, v in latencies.items()},
        "p99_ms_warmup": {r: 1e3 * percentile(v, 0.99) for r, v in warming.items()},
        "count_warmup": {r: len(v) for r, v in warming.items()},
        "jobs_submitted": len(submitted),
        "jobs_completed": sum(1 for s in statuses.values() if s == "succeeded"),
        "targets": {"errors": 0, "p99_ms_non_generation": 100, "jobs_completed": "== jobs_submitted"},
    }


def report(results: dict) -> None:
    print(f"\nLoad: {results['setup']['clients']} clients (mean think time {results['setup']['think_s']} s), "
          f"{results['setup']['duration_s']:.0f} s measured after {results['setup']['warmup_s']:.0f} s of warm-up, "
          f"{results['setup']['stack']}, base model {results['setup']['model']}\n")
    print(f"{results['requests']} requests, {results['throughput_rps']:.1f} req/s, errors {results['errors']}\n")
    print("| route | requests | p50 (ms) | p99 (ms) | p99 in the warm-up (ms) | target |\n|---|---:|---:|---:|---:|---|")
    for route, _ in MIX:
        if route in results["p99_ms"]:
            target = "-" if route in GENERATION_ROUTES else ("p99 < 100 ms: " + (
                "met" if results["p99_ms"][route] < 100 else "missed"))
            warm = results["p99_ms_warmup"].get(route)
            print(f"| {route} | {results['count'][route]} | {results['p50_ms'][route]:.1f} | "
                  f"{results['p99_ms'][route]:.1f} | {'-' if warm is None else f'{warm:.1f}'} | {target} |")
    print(f"\njobs completed {results['jobs_completed']} / submitted {results['jobs_submitted']}")


if __name__ == "__main__":
    main()
