"""A running service stack for tests: database, broker, artifact store, and a real Celery worker process.

Two flavours, as in deployment: `embedded` (SQLite file + filesystem broker, the
default) and `production` (the machine's PostgreSQL + Redis). The production
flavour skips when a service is unreachable, unless SBORA_REQUIRE_SERVICES=1
(set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("SBORA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SBORA_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def missing_dependency(reason: str) -> NoReturn:
    """Skip the test, or fail it where SBORA_REQUIRE_SERVICES=1 (CI) demands every dependency."""
    if os.environ.get("SBORA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and SBORA_REQUIRE_SERVICES=1 demands it")
    pytest.skip(reason)


def require_services() -> None:
    missing = [name for name, port in (("PostgreSQL", 5432), ("Redis", 6379)) if not _port_open("127.0.0.1", port)]
    if missing:
        missing_dependency(f"{' and '.join(missing)} not reachable on 127.0.0.1")


def clear_caches() -> None:
    """Settings and everything built from them are cached per process; tests switch settings."""
    from app import catalog, queue
    from app.core import config, db

    for cached in (config.get_settings, db.get_engine, db.get_side_engine, db.get_sessionmaker, catalog.configured,
                   catalog._summary, catalog._tokenizer, queue.get_celery):
        cached.cache_clear()
    catalog.forget_registered()
    from app.engine_process import reset_engines

    reset_engines()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own, which the test may kill and restart (state is not persisted)."""

    def __init__(self, workdir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            missing_dependency("redis-server is not installed")
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _port_open("127.0.0.1", self.port), 10, 0.05, "redis-server to listen")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        """Kill and start again: everything the broker held is gone."""
        self.kill()
        self.start()


@dataclass
class Stack:
    flavour: str
    env: dict[str, str]
    data_dir: Path
    worker_log: Path
    workers: list[subprocess.Popen] = field(default_factory=list)
    redis: PrivateRedis | None = None

    def start_worker(self, rlimits: dict[int, int] | None = None, quiet: bool = False,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
        """A worker in a process group of its own (so a test can kill it whole), optionally resource-limited;
        `env` overrides the stack's settings for this worker (another machine's directories)."""
        import resource

        from sbora_cli.server import worker_command_line

        def limit() -> None:
            for what, value in (rlimits or {}).items():
                resource.setrlimit(what, (value, value))

        log = subprocess.DEVNULL if quiet else open(self.worker_log, "a")
        # The same command line `sbora worker` runs in production.
        proc = subprocess.Popen(
            worker_command_line(self.env["SBORA_TRAIN_QUEUE"], name=f"w{len(self.workers)}"),
            cwd=ROOT, env={**os.environ, **self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=limit if rlimits else None,
        )
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: subprocess.Popen) -> None:
        """SIGKILL the worker's main process and its pool child at once, as a crash or the OOM killer would."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.workers.clear()

    def key(self, tenant: str, scope: str = "tenant") -> str:
        from app.core.db import session_scope
        from app.core.security import create_api_key

        with session_scope() as session:
            _, plain = create_api_key(session, tenant, scope=scope)
        return plain


def make_stack(flavour: str, tmp: Path, models: list[str], *, private_redis: bool = False,
               extra_env: dict[str, str] | None = None) -> tuple[Stack, callable]:
    """Set the environment for `flavour`, migrate, and return the stack plus its teardown.

    `private_redis` gives the production flavour a redis-server of its own (for tests that kill it)."""
    from app.migrate import upgrade_database

    suffix = secrets.token_hex(4)
    env = {
        "SBORA_DATA_DIR": str(tmp / "data"),
        "SBORA_MODELS": json.dumps(models),
        "SBORA_TRAIN_QUEUE": f"train-{suffix}",
        "SBORA_JOB_LEASE_S": "30",
        "SBORA_DATABASE_URL": "",
        "SBORA_BROKER_URL": "",
    }
    cleanup = []
    redis = None
    if flavour == "production":
        require_services()
        import psycopg

        db_name = f"sbora_test_{suffix}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db_name}"')

        def drop() -> None:
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

        cleanup.append(drop)
        base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        env["SBORA_DATABASE_URL"] = f"{base}/{db_name}"
        env["SBORA_BROKER_URL"] = REDIS_URL
        if private_redis:
            redis = PrivateRedis(tmp)
            cleanup.append(redis.kill)
            env["SBORA_BROKER_URL"] = redis.url
    else:
        del env["SBORA_DATABASE_URL"], env["SBORA_BROKER_URL"]
        os.environ.pop("SBORA_DATABASE_URL", None)
        os.environ.pop("SBORA_BROKER_URL", None)
    env.update(extra_env or {})
    saved_environ = dict(os.environ)
    os.environ.update(env)
    clear_caches()
    upgrade_database()
    stack = Stack(flavour=flavour, env=env, data_dir=tmp / "data", worker_log=tmp / "worker.log",
                  redis=redis if flavour == "production" and private_redis else None)

    def teardown() -> None:
        stack.stop_workers()
        from app.core.db import get_engine

        get_engine().dispose()
        for fn in cleanup:
            fn()
        # The next module's stack must not inherit this one's settings (extra_env especially).
        os.environ.clear()
        os.environ.update(saved_environ)
        clear_caches()

    return stack, teardown


@contextmanager
def embedded_stack_with_worker(tmp: Path, tiny_model_dir: Path,
                               extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """The embedded stack on the tiny model, with one worker running, torn down on exit."""
    stack, teardown = make_stack("embedded", tmp, [str(tiny_model_dir)], extra_env=extra_env)
    stack.start_worker()
    try:
        yield stack
    finally:
        teardown()


def train_tiny_adapter(client, headers: dict, dataset_id: str, variant: str = "sbora_fa", timeout: float = 180,
                       base_model: str = "tiny-llama") -> dict:
    """A few quick steps on a tiny model through the API (a TestClient or an httpx.Client); the finished job."""
    body = {"base_model": base_model, "training_dataset_id": dataset_id,
            "method": {"variant": variant, "r": 4, "alpha": 8},
            "hyperparameters": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.01, "max_seq_len": 128}}
    job = client.post("/jobs", headers=headers, json=body).json()
    done = wait_for(lambda: (j := client.get(f"/jobs/{job['id']}", headers=headers).json())["status"]
                    in ("succeeded", "failed") and j, timeout, 0.3, "training")
    assert done["status"] == "succeeded", done["error"]
    return done


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def chat_lines(n: int, offset: int = 0) -> bytes:
    colours = ["red", "green", "blue", "gold"]
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": f"Item {i}: which colour?"},
                                 {"role": "assistant", "content": f"The colour is {colours[i % 4]}."}]}) + "\n"
        for i in range(offset, offset + n)
    ).encode()


class LiveServer:
    """The app under a real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:
        import threading

        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, 0.05, "uvicorn to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
