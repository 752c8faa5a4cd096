"""Chaos soak: clients train and generate while workers, the generation engine and Redis are killed.

The stack runs as in production, each part a process of its own: the API under
uvicorn (with its reconciler and engine watchdog), two training workers kept
alive by the same supervisor `sbora serve` uses, and, for the production
flavour, PostgreSQL and a Redis of the bench's own. 20 clients (4 tenants) each
keep one small job in flight (8 steps on a tiny model, a checkpoint every 2)
and otherwise ask for 8-token generations, with think time. Every ~30 s a chaos
loop SIGKILLs a random worker (main and training process), or the engine
process, or (production) restarts Redis, which forgets its queue.

Afterwards every job must end, and the ratios are:
- `jobs_lost`: submitted jobs that did not succeed (target 0);
- `duplicate_adapters`: jobs registered with more than one final adapter (target 0);
- `generate_5xx_rate`: generation requests answered 5xx, over all (target <= 0.005); every 5xx
  must be a 503 with Retry-After (`generate_5xx_without_retry_after` counts the others);
- `max_recovery_s`: from a worker kill to the next progress event of a job it was running
  (target <= 20).

    .venv/bin/python bench/chaos.py                          # 10 minutes on each flavour
    .venv/bin/python bench/chaos.py --flavours embedded --duration 60 --chaos-every 15 --out /tmp/c.json

Writes bench/results/chaos.json (top-level `ratios`, and each flavour's figures and kill log).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psutil

from sbora_cli.server import worker_command_line
from sbora_cli.supervisor import Supervised

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

TARGETS = {"jobs_lost": "= 0", "duplicate_adapters": "= 0", "generate_5xx_rate": "<= 0.005",
           "max_recovery_s": "<= 20"}
PG_ADMIN = os.environ.get("SBORA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def chats(n: int, offset: int = 0) -> bytes:
    colours = ["red", "green", "blue", "gold"]
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"Item {i}: which colour?"},
                                            {"role": "assistant", "content": f"The colour is {colours[i % 4]}."}]})
                   + "\n" for i in range(offset, offset + n)).encode()


class Redis:
    """A redis-server of the bench's own, which the chaos loop restarts (it keeps nothing on disk)."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir = free_port(), workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _port_open(self.port), 10, "redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def stack(flavour: str, tmp: Path, workers: int, log: Path):
    """The API, supervised workers and (production) PostgreSQL + Redis, their output in `log`;
    yields (url, env, parts)."""
    from sbora_core.testing import build_tiny_model

    model = build_tiny_model(tmp / "tiny-llama")
    port = free_port()
    env = {**os.environ, "SBORA_DATA_DIR": str(tmp / "data"), "SBORA_MODELS": json.dumps([str(model)]),
           "SBORA_TRAIN_QUEUE": f"chaos-{port}", "SBORA_MAX_CONCURRENT_JOBS": "1000",
           "SBORA_QUEUED_STALE_S": "15", "SBORA_LOG_FORMAT": "json"}
    for var in ("SBORA_DATABASE_URL", "SBORA_BROKER_URL"):
        env.pop(var, None)
    cleanup: list = []
    redis = None
    if flavour == "production":
        import psycopg

        db = f"sbora_chaos_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db}"')

        def drop() -> None:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

        cleanup.append(drop)
        redis = Redis(tmp)
        cleanup.append(redis.stop)
        env["SBORA_DATABASE_URL"] = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{db}"
        env["SBORA_BROKER_URL"] = redis.url
    logs = open(log, "w")
    subprocess.run([sys.executable, "-m", "sbora_cli.main", "migrate"], env=env, cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=logs)
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port), "--log-level",
                            "warning"], env=env, cwd=ROOT, stdout=logs, stderr=logs, start_new_session=True)
    supervised = []
    for i in range(workers):
        command = worker_command_line(env["SBORA_TRAIN_QUEUE"], name=f"chaos{i}")
        worker = Supervised(f"worker {i}", partial(subprocess.Popen, command, env=env, cwd=ROOT, stdout=logs,
                                                   stderr=logs, start_new_session=True))
        worker.start()
        supervised.append(worker)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(url), 120, "the API and its workers")
        yield url, env, {"api": api, "workers": supervised, "redis": redis}
    finally:
        for worker in supervised:
            worker.stop(timeout=20)
        os.killpg(api.pid, signal.SIGTERM)
        try:
            api.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(api.pid, signal.SIGKILL)
        for fn in cleanup:
            fn()
        logs.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def api_key(env: dict[str, str], tenant: str) -> str:
    done = subprocess.run([sys.executable, "-m", "sbora_cli.main", "keys", "create", "--tenant", tenant], env=env,
                          cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs: dict[str, str] = field(default_factory=dict)  # job id -> tenant key
    generations: int = 0
    five_xx: int = 0
    five_xx_without_retry_after: int = 0
    generation_ok_at: list[float] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)


def client_loop(url: str, key: str, dataset: str, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {key}"}
    mine: str | None = None
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        while not stop.is_set():
            try:
                if mine is None or http.get(f"/jobs/{mine}").json()["status"] in ("succeeded", "failed", "cancelled"):
                    response = http.post("/jobs", json={
                        "base_model": "tiny-llama", "training_dataset_id": dataset, "name": f"chaos-{seed}",
                        "method": {"variant": rng.choice(["sbora_fa", "sbora_fb"]), "r": 4, "alpha": 8},
                        "hyperparameters": {"max_steps": 8, "batch_size": 4, "max_seq_len": 96,
                                            "checkpoint_every": 2, "learning_rate": 0.01, "seed": rng.randrange(100)}})
                    if response.status_code == 201:
                        mine = response.json()["id"]
                        with tally.lock:
                            tally.jobs[mine] = key
                    else:
                        with tally.lock:
                            tally.other_errors.append(f"POST /jobs {response.status_code}: {response.text[:200]}")
                response = http.post("/generate", json={"prompt": f"Item {rng.randrange(50)}: which colour?",
                                                        "max_new_tokens": 8, "temperature": 0})
                with tally.lock:
                    tally.generations += 1
                    if response.status_code >= 500:
                        tally.five_xx += 1
                        if response.status_code != 503 or "retry-after" not in response.headers:
                            tally.five_xx_without_retry_after += 1
                    elif response.status_code == 200:
                        tally.generation_ok_at.append(time.monotonic())
                    else:
                        tally.other_errors.append(f"POST /generate {response.status_code}: {response.text[:200]}")
            except httpx.TransportError as exc:
                with tally.lock:
                    tally.other_errors.append(f"transport: {exc}")
            stop.wait(rng.uniform(0.2, 1.0))


def engine_process(api: subprocess.Popen) -> psutil.Process | None:
    """The generation engine: the API's spawned child (not multiprocessing's resource tracker)."""
    for child in psutil.Process(api.pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def running_jobs_of(url: str, keys: list[str], node_prefix: str) -> list[str]:
    """The jobs a worker runs now: running jobs whose latest start names that worker."""
    held = []
    for key in keys:
        headers = {"Authorization": f"Bearer {key}"}
        for job in httpx.get(f"{url}/jobs", headers=headers, params={"status": "running", "limit": 200},
                             timeout=30).json()["data"]:
            starts = httpx.get(f"{url}/jobs/{job['id']}/events", headers=headers,
                               params={"kind": "status", "limit": 1000}, timeout=30).json()["data"]
            workers = [e["data"].get("worker", "") for e in starts if e["data"].get("status") == "running"]
            if workers and workers[-1].startswith(node_prefix):
                held.append(job["id"])
    return held


def soak(flavour: str, duration: float, chaos_every: float, clients: int, workers: int) -> dict[str, Any]:
    log = Path(tempfile.gettempdir()) / f"sbora-chaos-{flavour}.log"  # kept, to read after a surprise
    print(f"{flavour}: the stack's output goes to {log}", flush=True)
    with tempfile.TemporaryDirectory() as scratch, stack(flavour, Path(scratch), workers, log) as (url, env, parts):
        keys = [api_key(env, f"tenant{i}") for i in range(4)]
        datasets = {}
        for key in keys:
            response = httpx.post(f"{url}/datasets", headers={"Authorization": f"Bearer {key}"},
                                  files={"file": ("c.jsonl", chats(24))}, timeout=60)
            response.raise_for_status()
            datasets[key] = response.json()["id"]
        tally, stop = Tally(), threading.Event()
        threads = [threading.Thread(target=client_loop, args=(url, keys[i % 4], datasets[keys[i % 4]], tally, stop, i),
                                    daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        kills: list[dict[str, Any]] = []
        rng = random.Random(0)
        started = time.monotonic()
        actions = ["worker", "engine"] + (["redis"] if parts["redis"] is not None else [])
        while time.monotonic() - started < duration:
            time.sleep(min(rng.uniform(0.7, 1.3) * chaos_every, max(0.0, duration - (time.monotonic() - started))))
            if time.monotonic() - started >= duration:
                break
            action = actions[len(kills) % len(actions)]  # each kind in turn, so a short run meets them all
            at = time.monotonic()
            if action == "worker":
                index = rng.randrange(workers)
                affected = running_jobs_of(url, keys, f"chaos{index}@")
                child = parts["workers"][index].child
                wall = time.time()
                if child is not None:
                    os.killpg(child.pid, signal.SIGKILL)
                kills.append({"action": "worker", "worker": index, "at": at - started, "wall": wall,
                              "jobs": affected})
            elif action == "engine":
                engine = engine_process(parts["api"])
                if engine is not None:
                    engine.kill()
                kills.append({"action": "engine", "at": at - started, "found": engine is not None})
            else:
                parts["redis"].restart()
                kills.append({"action": "redis", "at": at - started})
            print(f"  {at - started:5.0f} s: {kills[-1]}", file=sys.stderr, flush=True)
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
        return measure(url, tally, kills)


def measure(url: str, tally: Tally, kills: list[dict[str, Any]]) -> dict[str, Any]:
    def job(job_id: str) -> dict:
        return httpx.get(f"{url}/jobs/{job_id}", headers={"Authorization": f"Bearer {tally.jobs[job_id]}"},
                         timeout=30).json()

    def all_ended() -> bool:
        return all(job(j)["status"] in ("succeeded", "failed", "cancelled") for j in tally.jobs)

    try:
        wait_until(all_ended, 600, "every job to end", interval=2)
    except TimeoutError:
        pass
    final = {j: job(j) for j in tally.jobs}
    lost = [j for j, row in final.items() if row["status"] != "succeeded"]
    adapters: dict[str, int] = {}
    for key in set(tally.jobs.values()):
        page = httpx.get(f"{url}/adapters", headers={"Authorization": f"Bearer {key}"}, params={"limit": 200},
                         timeout=30).json()
        for adapter in page["data"]:
            adapters[adapter["job_id"]] = adapters.get(adapter["job_id"], 0) + 1
    recoveries = []
    for kill in kills:
        if kill["action"] != "worker":
            continue
        for job_id in kill["jobs"]:
            if job_id not in tally.jobs:
                continue
            key = tally.jobs[job_id]
            events = httpx.get(f"{url}/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"},
                               params={"kind": "metric", "limit": 1000}, timeout=30).json()["data"]
            recovery = _recovery(events, kill["wall"])
            kill.setdefault("recovery_s", {})[job_id] = recovery
            if recovery is not None:
                recoveries.append(recovery)
    return {
        "jobs": len(final), "succeeded": len(final) - len(lost), "lost": {j: final[j]["status"] for j in lost},
        "generations": tally.generations, "generate_5xx": tally.five_xx,
        "generate_5xx_without_retry_after": tally.five_xx_without_retry_after,
        "other_errors": tally.other_errors[:20], "other_error_count": len(tally.other_errors),
        "kills": kills, "recoveries_s": recoveries,
        "duplicate_adapters": sum(1 for n in adapters.values() if n > 1),
    }


def _recovery(events: list[dict], killed_at: float) -> float | None:
    """Seconds from the kill (wall clock) to the job's next progress event; None if it had none after."""
    from datetime import datetime

    later = [t for t in (datetime.fromisoformat(e["created_at"]).timestamp() for e in events) if t > killed_at]
    return round(min(later) - killed_at, 2) if later else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavours", nargs="+", default=["embedded", "production"], choices=["embedded", "production"])
    parser.add_argument("--duration", type=float, default=600, help="seconds of chaos per flavour")
    parser.add_argument("--chaos-every", type=float, default=30)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    args = parser.parse_args()
    if shutil.which("redis-server") is None and "production" in args.flavours:
        parser.error("the production flavour starts a redis-server of its own: install Redis")

    flavours = {}
    for flavour in args.flavours:
        print(f"{flavour}: {args.duration:.0f} s of chaos, a kill every ~{args.chaos_every:.0f} s", file=sys.stderr)
        flavours[flavour] = soak(flavour, args.duration, args.chaos_every, args.clients, args.workers)
    generations = sum(f["generations"] for f in flavours.values())
    recoveries = [r for f in flavours.values() for r in f["recoveries_s"]]
    ratios = {
        "jobs_lost": sum(len(f["lost"]) for f in flavours.values()),
        "duplicate_adapters": sum(f["duplicate_adapters"] for f in flavours.values()),
        "generate_5xx_rate": round(sum(f["generate_5xx"] for f in flavours.values()) / max(1, generations), 5),
        "generate_5xx_without_retry_after": sum(f["generate_5xx_without_retry_after"] for f in flavours.values()),
        "max_recovery_s": max(recoveries) if recoveries else None,
    }
    report = {"settings": vars(args) | {"out": str(args.out)}, "targets": TARGETS, "ratios": ratios,
              "flavours": flavours}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    for name, f in flavours.items():
        print(f"{name}: {f['jobs']} jobs ({len(f['lost'])} lost), {f['generations']} generations "
              f"({f['generate_5xx']} 5xx), {len(f['kills'])} kills, recoveries {f['recoveries_s']}")
    print(f"ratios: {json.dumps(ratios)}\nwrote {args.out}")


if __name__ == "__main__":
    main()
