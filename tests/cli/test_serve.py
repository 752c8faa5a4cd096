"""`sbora serve` keeps its worker alive: a killed worker is restarted (and reaped), /readyz follows;
the API key comes alone on stdout; `sbora keys list` shows ids whole; worker names say cpu or gpu."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
from stack import wait_for

from app.core.processes import exit_reason
from sbora_cli.supervisor import Supervised


def serve_env(tmp_path, tiny_model_dir) -> dict[str, str]:
    env = {**os.environ, "SBORA_DATA_DIR": str(tmp_path / "data"), "SBORA_MODELS": json.dumps([str(tiny_model_dir)]),
           "SBORA_WORKER_HEARTBEAT_S": "1", "SBORA_LOG_FORMAT": "json"}
    for var in ("SBORA_DATABASE_URL", "SBORA_BROKER_URL"):
        env.pop(var, None)
    return env


def ready(url: str) -> dict | None:
    try:
        response = httpx.get(f"{url}/readyz")
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def celery_workers(serve: psutil.Process) -> list[psutil.Process]:
    """The Celery main processes among `sbora serve`'s children (a zombie does not count)."""
    return [p for p in serve.children() if "celery" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]


def test_a_killed_worker_is_restarted_and_reaped_and_sigterm_stops_it(tmp_path, tiny_model_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        # Beats every 0.3 s: the dead worker stops counting within 0.9 s, before the supervisor's first
        # restart (1 s later) can be ready, so there is a window with no live worker to observe.
        proc = subprocess.Popen([sys.executable, "-m", "sbora_cli.main", "serve", "--port", str(port)],
                                env={**serve_env(tmp_path, tiny_model_dir), "SBORA_WORKER_HEARTBEAT_S": "0.3"},
                                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        key = proc.stdout.readline().strip()  # the key, alone on the first line of stdout
        assert key.startswith("sbora-") and " " not in key
        wait_for(lambda: ready(url), 90, 0.5, "the API and its worker to be ready")
        assert httpx.get(f"{url}/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        serve = psutil.Process(proc.pid)
        [first] = celery_workers(serve)
        first.send_signal(signal.SIGKILL)
        # Not ready while no worker lives (three missed beats), then ready again with a new one.
        wait_for(lambda: not ready(url), 30, 0.05, "readiness to notice the dead worker")
        wait_for(lambda: ready(url), 90, 0.5, "a restarted worker")
        [second] = celery_workers(serve)
        assert second.pid != first.pid
        assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() != psutil.STATUS_ZOMBIE
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        assert any("killed by SIGKILL; starting it again" in e.get("message", "") for e in lines)
        # A SIGTERM to `sbora serve` alone (systemd, docker stop) stops its worker too: none is orphaned.
        worker_processes = [second, *second.children()]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        _, orphans = psutil.wait_procs(worker_processes, timeout=30)
        assert not orphans, f"sbora serve exited and left its worker running: {orphans}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:  # the group is gone: nothing left to stop
            pass
        proc.wait(timeout=60)


def test_the_supervisor_backs_off_a_child_that_keeps_dying():
    started: list[float] = []

    def start() -> subprocess.Popen:
        started.append(time.monotonic())
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    supervisor = Supervised("crasher", start)
    supervisor.start()
    wait_for(lambda: len(started) >= 4, 30, 0.05, "four starts")
    supervisor.stop()
    gaps = [b - a for a, b in zip(started, started[1:], strict=False)]
    assert gaps[1] > gaps[0] + 0.5 and gaps[2] > gaps[1] + 1  # 1 s, 2 s, 4 s ...
    assert exit_reason(3) == "exited with code 3" and exit_reason(-9) == "killed by SIGKILL"


def test_keys_list_shows_ids_whole_on_a_narrow_terminal(tmp_path, tiny_model_dir):
    env = {**serve_env(tmp_path, tiny_model_dir), "COLUMNS": "50"}
    created = subprocess.run([sys.executable, "-m", "sbora_cli.main", "keys", "create", "--tenant", "a-rather-long-name",
                              "--name", "a label that takes room"], env=env, capture_output=True, text=True, check=True)
    key_id = next(w for w in created.stderr.split() if w.startswith("key_"))
    listed = subprocess.run([sys.executable, "-m", "sbora_cli.main", "keys", "list"], env=env, capture_output=True,
                            text=True, check=True)
    assert key_id in listed.stdout
    revoked = subprocess.run([sys.executable, "-m", "sbora_cli.main", "keys", "revoke", key_id], env=env,
                             capture_output=True, text=True)
    assert revoked.returncode == 0, revoked.stderr


def test_worker_names_say_what_they_train_on():
    import torch

    from sbora_cli.server import worker_command_line, worker_kind

    assert worker_kind() == ("gpu" if torch.cuda.is_available() else "cpu")
    line = worker_command_line("train", name=worker_kind())
    assert line[line.index("-n") + 1] == f"{worker_kind()}@%h"
