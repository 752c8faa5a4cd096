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
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

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


def require_services() -> None:
    missing = [name for name, port in (("PostgreSQL", 5432), ("Redis", 6379)) if not _port_open("127.0.0.1", port)]
    if missing:
        reason = f"{' and '.join(missing)} not reachable on 127.0.0.1"
        if os.environ.get("SBORA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason}, and SBORA_REQUIRE_SERVICES=1 demands them")
        pytest.skip(reason)


def clear_caches() -> None:
    """Settings and everything built from them are cached per process; tests switch settings."""
    from app import catalog
    from app.core import config, db
    from worker import celery_app

    for cached in (config.get_settings, db.get_engine, db.get_sessionmaker, catalog.offered, catalog.summary,
                   catalog.tokenizer, celery_app.get_celery):
        cached.cache_clear()
    from app.inference import reset_engines

    reset_engines()


@dataclass
class Stack:
    flavour: str
    env: dict[str, str]
    data_dir: Path
    worker_log: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    def start_worker(self) -> subprocess.Popen:
        log = open(self.worker_log, "a")
        from sbora_cli.server import worker_command_line

        # The same command line `sbora worker` runs in production.
        proc = subprocess.Popen(
            worker_command_line(self.env["SBORA_TRAIN_QUEUE"], name=f"w{len(self.workers)}"),
            cwd=ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.workers.clear()

    def key(self, tenant: str) -> str:
        from app.core.db import session_scope
        from app.core.security import create_api_key

        with session_scope() as session:
            _, plain = create_api_key(session, tenant)
        return plain


def make_stack(flavour: str, tmp: Path, models: list[str]) -> tuple[Stack, callable]:
    """Set the environment for `flavour`, migrate, and return the stack plus its teardown."""
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
    else:
        del env["SBORA_DATABASE_URL"], env["SBORA_BROKER_URL"]
        os.environ.pop("SBORA_DATABASE_URL", None)
        os.environ.pop("SBORA_BROKER_URL", None)
    os.environ.update(env)
    clear_caches()
    upgrade_database()
    stack = Stack(flavour=flavour, env=env, data_dir=tmp / "data", worker_log=tmp / "worker.log")

    def teardown() -> None:
        stack.stop_workers()
        from app.core.db import get_engine

        get_engine().dispose()
        for fn in cleanup:
            fn()

    return stack, teardown


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
