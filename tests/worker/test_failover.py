"""Failover in seconds: a killed worker's job runs again at once (not after its lease), from its last
checkpoint, to the same adapter; the reconciler sends one message per attempt; /readyz and /metrics
know the live workers. Real worker processes, killed with SIGKILL."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import time
import zipfile

import psutil
import pytest
from fastapi.testclient import TestClient
from stack import make_stack, wait_for

TINY = "tiny-llama"
# A long lease: taking over must not wait for it.
# No generation here: the engine stays cold, so readiness is about workers and no model load competes
# with the timings.
FAILOVER = {"SBORA_JOB_LEASE_S": "120", "SBORA_RECONCILE_INTERVAL_S": "1", "SBORA_WORKER_HEARTBEAT_S": "1",
            "SBORA_QUEUED_STALE_S": "3", "SBORA_ENGINE_WARM_START": "0"}


@pytest.fixture(scope="module", params=["embedded", "production"])
def stack(request, tmp_path_factory, tiny_model_dir):
    stack, teardown = make_stack(request.param, tmp_path_factory.mktemp(f"failover-{request.param}"),
                                 [str(tiny_model_dir)], extra_env=FAILOVER)
    yield stack
    teardown()


@pytest.fixture(scope="module")
def client(stack):
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def headers(stack):
    return {"Authorization": f"Bearer {stack.key('ops')}"}


@pytest.fixture(scope="module")
def dataset_id(client, headers):
    story = "The quick brown fox jumps over the lazy dog. " * 3
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": f"Story {i}: {story}"},
                                             {"role": "assistant", "content": f"Summary {i}: {story[:60]}"}]}) + "\n"
                    for i in range(32))
    response = client.post("/datasets", headers=headers, files={"file": ("stories.jsonl", lines.encode())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job_body(dataset_id: str, **hp) -> dict:
    return {"base_model": TINY, "training_dataset_id": dataset_id,
            "method": {"variant": "sbora_fa", "r": 4, "alpha": 8, "dropout": 0.1},
            "hyperparameters": {"max_steps": 40, "batch_size": 8, "learning_rate": 0.01, "max_seq_len": 400,
                                "checkpoint_every": 5, "seed": 5, **hp}}


def get(client, headers, path, **params):
    return client.get(path, headers=headers, params=params).json()


def wait_terminal(client, headers, job_id, timeout=300):
    return wait_for(lambda: (j := get(client, headers, f"/jobs/{job_id}"))["status"]
                    in ("succeeded", "failed", "cancelled") and j, timeout, 0.3, f"job {job_id} to end")


def factors(client, headers, adapter_id):
    from safetensors.torch import load

    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/adapters/{adapter_id}", headers=headers).content))
    return load(archive.read("adapter_model.safetensors"))


def live_nodes() -> set[str]:
    """Live workers by their Celery node name (`w0@host`; the rows add `#pid`)."""
    from app.core.db import session_scope
    from app.services.workers import live_workers

    with session_scope() as session:
        return {w.node.split("#")[0] for w in live_workers(session)}


def node_of(index: int) -> str:
    return f"w{index}@{socket.gethostname()}"


def attempt_started(client, headers, job_id, attempt):
    events = get(client, headers, f"/jobs/{job_id}/events", kind="status", limit=1000)["data"]
    return any(e["data"].get("attempt") == attempt for e in events)


def test_readyz_and_metrics_count_the_live_workers(stack, client):
    assert not live_nodes()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "no live worker" in ready.json()["checks"]["workers"]
    worker = stack.start_worker()
    node = node_of(len(stack.workers) - 1)
    wait_for(lambda: node in live_nodes(), 60, 0.2, "the worker's first heartbeat")
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["workers"] == {stack.env["SBORA_TRAIN_QUEUE"]: 1}
    metrics = client.get("/metrics").text
    assert f'sbora_workers_live{{kind="cpu",queue="{stack.env["SBORA_TRAIN_QUEUE"]}"}} 1.0' in metrics
    stack.kill_worker(worker)  # three missed beats later it is dead
    wait_for(lambda: node not in live_nodes(), 30, 0.2, "the dead worker to be noticed")
    assert client.get("/readyz").status_code == 503
    stack.stop_workers()


@pytest.mark.alone  # asserts how long it takes: run by itself
def test_a_killed_worker_s_job_runs_again_within_seconds_to_the_same_adapter(stack, client, headers, dataset_id):
    stack.start_worker()
    reference = wait_terminal(client, headers, client.post("/jobs", headers=headers,
                                                           json=job_body(dataset_id)).json()["id"])
    assert reference["status"] == "succeeded", reference["error"]

    victim = client.post("/jobs", headers=headers, json=job_body(dataset_id)).json()
    wait_for(lambda: get(client, headers, f"/jobs/{victim['id']}/events", kind="checkpoint")["data"], 120, 0.05,
             "the first checkpoint")
    stack.kill_worker(stack.workers[-1])  # the whole worker: main process and its training process
    assert get(client, headers, f"/jobs/{victim['id']}")["status"] == "running"

    stack.start_worker()
    node = node_of(len(stack.workers) - 1)
    wait_for(lambda: node in live_nodes(), 60, 0.2, "the new worker's first heartbeat")
    available = time.monotonic()
    wait_for(lambda: attempt_started(client, headers, victim["id"], 2), 30, 0.2, "the job's second attempt")
    assert time.monotonic() - available <= 15, "a dead worker's job must be taken over in seconds"

    done = wait_terminal(client, headers, victim["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    logs = [e["message"] for e in get(client, headers, f"/jobs/{victim['id']}/events", limit=1000)["data"]]
    assert any(m.startswith("resumed from step-") for m in logs), logs
    a, b = factors(client, headers, reference["adapter_id"]), factors(client, headers, done["adapter_id"])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "resumed adapter differs"
    stack.stop_workers()


@pytest.mark.alone  # asserts how long it takes: run by itself
def test_a_killed_training_process_is_taken_over_by_its_worker_at_once(stack, client, headers, dataset_id):
    worker = stack.start_worker()
    job = client.post("/jobs", headers=headers, json=job_body(dataset_id)).json()
    wait_for(lambda: get(client, headers, f"/jobs/{job['id']}/events", kind="checkpoint")["data"], 120, 0.05,
             "the first checkpoint")
    trainer = psutil.Process(worker.pid).children()[0]
    killed = time.monotonic()
    os.kill(trainer.pid, signal.SIGKILL)  # Celery puts the message back; the new pool process claims it
    wait_for(lambda: attempt_started(client, headers, job["id"], 2), 30, 0.2, "the job's second attempt")
    assert time.monotonic() - killed <= 15, "the lease (120 s) must not be waited out"
    assert wait_terminal(client, headers, job["id"])["status"] == "succeeded"
    stack.stop_workers()


def broker_messages(stack) -> int:
    """Messages waiting on the stack's training queue, read from the broker itself."""
    queue = stack.env["SBORA_TRAIN_QUEUE"]
    if stack.flavour == "production":
        import redis

        return int(redis.Redis.from_url(stack.env["SBORA_BROKER_URL"]).llen(queue))
    folder = stack.data_dir / "broker" / "queue"  # the embedded broker: a file per message
    return sum(1 for p in folder.iterdir() if p.name.endswith(f".{queue}.msg"))


def test_the_reconciler_sends_one_message_per_attempt(stack, client, headers, dataset_id):
    from datetime import timedelta

    from app.core.db import session_scope
    from app.models import Job, utcnow
    from app.reconcile import reconcile_once

    assert broker_messages(stack) == 0
    job = client.post("/jobs", headers=headers, json=job_body(dataset_id)).json()
    assert broker_messages(stack) == 1
    # No worker is alive: however stale, the message is waiting, not lost. Nothing more is sent.
    with session_scope() as session:
        session.get(Job, job["id"]).enqueued_at = utcnow() - timedelta(hours=1)
    for _ in range(3):
        reconcile_once()
    assert broker_messages(stack) == 1

    # A running job whose worker is gone (no heartbeat ever): exactly one message for its next attempt.
    with session_scope() as session:
        row = session.get(Job, job["id"])
        row.status, row.attempts, row.lease_owner = "running", 1, "elsewhere:1:1"
        row.worker_node, row.lease_expires_at = "gone@elsewhere", utcnow() + timedelta(hours=1)
    for _ in range(3):
        reconcile_once()
    assert broker_messages(stack) == 2
    with session_scope() as session:
        row = session.get(Job, job["id"])
        assert row.enqueued_attempt == 2
        row.status, row.cancel_requested = "cancelled", True  # leave nothing for the next test


def test_a_worker_slow_to_claim_its_message_is_not_taken_for_idle(stack, client, headers, dataset_id):
    """On a loaded machine a pool process can take seconds to claim the job whose message its worker
    holds. The reconciler must not take that message for lost and send a second one: a worker holding
    a message is busy from its arrival. Here a row lock on the job holds the claim up."""
    if stack.flavour != "production":
        pytest.skip("SQLite locks the whole database, so the heartbeat would wait too; a row lock is PostgreSQL's")
    from sqlalchemy import text

    from app.core.db import get_side_engine, session_scope
    from app.models import Job

    job = client.post("/jobs", headers=headers, json=job_body(dataset_id)).json()
    with session_scope() as session:
        first_send = session.get(Job, job["id"]).enqueued_at
    stale_s = float(stack.env["SBORA_QUEUED_STALE_S"])
    with get_side_engine().connect() as lock:
        lock.execute(text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": job["id"]})
        stack.start_worker()
        node = node_of(len(stack.workers) - 1)
        wait_for(lambda: node in live_nodes(), 60, 0.2, "the worker's first heartbeat")
        time.sleep(stale_s + 3)  # the message is stale and the worker has lived that long: was it resent?
        assert get(client, headers, f"/jobs/{job['id']}")["status"] == "queued"
        lock.rollback()
    assert wait_terminal(client, headers, job["id"])["status"] == "succeeded"
    with session_scope() as session:
        assert session.get(Job, job["id"]).enqueued_at == first_send, "the job was sent twice"
    assert broker_messages(stack) == 0
    stack.stop_workers()
