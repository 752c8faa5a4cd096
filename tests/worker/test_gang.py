"""A job spanning two machines, gang-scheduled through the database and the queue: two workers on this
host, each a machine of its own (its own data directory, scratch space, model cache and address),
sharing only PostgreSQL, Redis and the S3 test server; torchrun's c10d rendezvous joins their ranks."""

from __future__ import annotations

import io
import json
import os
import signal
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from object_store import ObjectStoreServer
from stack import make_stack, wait_for

TINY = "tiny-llama"
GANG = {"SBORA_JOB_LEASE_S": "30", "SBORA_RECONCILE_INTERVAL_S": "1", "SBORA_WORKER_HEARTBEAT_S": "1",
        "SBORA_QUEUED_STALE_S": "3", "SBORA_ENGINE_WARM_START": "0", "SBORA_GANG_TIMEOUT_S": "8",
        "SBORA_DISTRIBUTED_STEP_TIMEOUT_S": "20"}


def machine(root: Path, i: int) -> dict[str, str]:
    """What is a machine's own; 127.0.0.x are this host's loopback addresses, one per machine."""
    home = root / f"machine{i}"
    return {"SBORA_DATA_DIR": str(home / "data"), "SBORA_MODEL_CACHE": str(home / "models"),
            "SBORA_WORKER_ADDRESS": f"127.0.0.{i + 1}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("gang")
    s3 = ObjectStoreServer(root)
    stack, teardown = make_stack("production", root, [str(tiny_model_dir)],
                                 extra_env={**GANG, **s3.env(s3.new_bucket())})
    try:
        yield stack, root
    finally:
        teardown()
        s3.stop()


@pytest.fixture(scope="module")
def client(cluster):
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def headers(cluster):
    return {"Authorization": f"Bearer {cluster[0].key('ops')}"}


@pytest.fixture(scope="module")
def dataset_id(client, headers):
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": f"Item {i}: which colour?"},
                                             {"role": "assistant", "content": f"The colour is {c}."}]}) + "\n"
                    for i, c in enumerate(["red", "green", "blue", "gold"] * 8))
    response = client.post("/datasets", headers=headers, files={"file": ("colours.jsonl", lines.encode())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job_body(dataset_id: str, nodes: int = 2, **hp) -> dict:
    return {"base_model": TINY, "training_dataset_id": dataset_id, "resources": {"nodes": nodes},
            "method": {"variant": "sbora_fa", "r": 4, "alpha": 8, "dropout": 0.0},
            "hyperparameters": {"max_steps": 10, "batch_size": 5, "learning_rate": 0.01, "max_seq_len": 64,
                                "checkpoint_every": 2, "seed": 3, **hp}}


def get(client, headers, path, **params):
    return client.get(path, headers=headers, params=params).json()


def status(client, headers, job_id) -> dict:
    return get(client, headers, f"/jobs/{job_id}")


def wait_terminal(client, headers, job_id, timeout=240):
    return wait_for(lambda: (j := status(client, headers, job_id))["status"]
                    in ("succeeded", "failed", "cancelled") and j, timeout, 0.3, f"job {job_id} to end")


def factors(client, headers, adapter_id) -> dict:
    from safetensors.torch import load

    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/adapters/{adapter_id}", headers=headers).content))
    return load(archive.read("adapter_model.safetensors"))


def slots_of(job_id: str) -> list:
    from app.core.db import session_scope
    from app.models import GangSlot

    with session_scope() as session:
        return [(s.formation, s.slot, s.hostname) for s in session.query(GangSlot).filter_by(job_id=job_id)]


def ranks_running(job_id: str) -> list[int]:
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"sbora_core.training.rank" in cmdline and job_id.encode() in cmdline \
                and b"torch.distributed.run" not in cmdline:
            alive.append(int(pid))
    return alive


def two_machines(stack, root) -> list:
    workers = [stack.start_worker(env=machine(root, i)) for i in range(2)]

    def both_beat() -> bool:
        from app.core.db import session_scope
        from app.services import workers as live

        with session_scope() as session:
            return len({w.address for w in live.live_workers(session)}) == 2
    wait_for(both_beat, 60, 0.2, "both machines' heartbeats")
    return workers


def test_a_gang_that_cannot_fill_waits_saying_so_and_leaves_no_claim(cluster, client, headers, dataset_id):
    stack, root = cluster
    two_machines(stack, root)
    busy = client.post("/jobs", headers=headers, json=job_body(dataset_id, nodes=1, max_steps=5000)).json()
    wait_for(lambda: status(client, headers, busy["id"])["progress"].get("step", 0) >= 1, 120, 0.2, "a busy machine")

    gang = client.post("/jobs", headers=headers, json=job_body(dataset_id))
    assert gang.status_code == 201, gang.text
    job_id = gang.json()["id"]
    waiting = wait_for(lambda: [e for e in get(client, headers, f"/jobs/{job_id}/events", kind="log")["data"]
                                if e["data"].get("waiting_for") == "gang"], 60, 0.3, "the gang to give up")
    assert "waiting for 2 machines with 1 free devices each; 1 joined" in waiting[0]["message"]
    assert status(client, headers, job_id)["status"] == "queued" and slots_of(job_id) == []
    assert client.post(f"/jobs/{job_id}/cancel", headers=headers).json()["status"] == "cancelled"
    client.post(f"/jobs/{busy['id']}/cancel", headers=headers)
    assert wait_terminal(client, headers, busy["id"])["status"] == "cancelled"
    stack.stop_workers()


def test_a_job_on_two_machines_resumes_after_losing_one_to_the_same_adapter(cluster, client, headers, dataset_id):
    stack, root = cluster
    workers = two_machines(stack, root)
    reference = client.post("/jobs", headers=headers, json=job_body(dataset_id, nodes=1)).json()
    reference = wait_terminal(client, headers, reference["id"])
    assert reference["status"] == "succeeded", reference["error"]

    job = client.post("/jobs", headers=headers, json=job_body(dataset_id)).json()
    wait_for(lambda: get(client, headers, f"/jobs/{job['id']}/events", kind="checkpoint")["data"], 180, 0.1,
             "the first checkpoint")
    running = status(client, headers, job["id"])
    assert running["status"] == "running" and len(ranks_running(job["id"])) == 2
    gang = [e for e in get(client, headers, f"/jobs/{job['id']}/events", kind="status")["data"]
            if e["data"].get("gang")][-1]["data"]["gang"]
    assert sorted(gang) == ["127.0.0.1", "127.0.0.2"]

    # The machine that is not node 0 dies whole: its worker, torchrun and rank, at once.
    from app.core.db import session_scope
    from app.models import Job, Worker

    with session_scope() as session:
        leader = session.get(Worker, session.get(Job, job["id"]).worker_node)
        follower = next(w for w in workers if w.pid != leader.pid)
    os.killpg(follower.pid, signal.SIGKILL)
    follower.wait()
    wait_for(lambda: ranks_running(job["id"]) == [], 20, 0.2, "every rank of the job to stop")
    wait_for(lambda: status(client, headers, job["id"])["status"] == "queued", 30, 0.2, "the job to go back")

    stack.start_worker(env=machine(root, workers.index(follower)))  # the machine comes back
    done = wait_terminal(client, headers, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] >= 2
    logs = [e["message"] for e in get(client, headers, f"/jobs/{job['id']}/events", kind="log", limit=1000)["data"]]
    assert any(m.startswith("resumed from step-") for m in logs), logs
    got, want = factors(client, headers, done["adapter_id"]), factors(client, headers, reference["adapter_id"])
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        if tensor.is_floating_point():
            assert float((got[name] - tensor).abs().max() / tensor.abs().max()) < 1e-5, name
    assert slots_of(job["id"]) == [] and ranks_running(job["id"]) == []
    stack.stop_workers()
