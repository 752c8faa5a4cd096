"""Several machines on one host, sharing nothing but the services: two API replicas and two workers,
each with its own data directory, scratch space and model cache, over one PostgreSQL, one Redis and
one S3-compatible object store. No directory is shared. Jobs spread over both workers; a worker
killed mid-job is replaced by the other, which resumes from the checkpoint in the object store to
the same adapter, bit for bit; either replica serves every adapter."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import zipfile

import httpx
import pytest
from object_store import ObjectStoreServer
from stack import ROOT, free_port, make_stack, wait_for

TINY = "tiny-llama"
FAST_FAILOVER = {"SBORA_JOB_LEASE_S": "120", "SBORA_RECONCILE_INTERVAL_S": "1", "SBORA_WORKER_HEARTBEAT_S": "1",
                 "SBORA_QUEUED_STALE_S": "3", "SBORA_ENGINE_WARM_START": "0"}


def machine(root, name: str) -> dict[str, str]:
    """What is a machine's own: its data directory (scratch, copies of artifacts) and model cache."""
    home = root / name
    return {"SBORA_DATA_DIR": str(home / "data"), "SBORA_MODEL_CACHE": str(home / "models")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("cluster")
    s3 = ObjectStoreServer(root)
    stack, teardown = make_stack("production", root, [str(tiny_model_dir)],
                                 extra_env={**FAST_FAILOVER, **s3.env(s3.new_bucket())})
    logs = open(root / "api.log", "ab")
    apis, urls = [], []
    try:
        for i in range(2):
            port = free_port()
            apis.append(subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "warning"], cwd=ROOT, env={**os.environ, **stack.env, **machine(root, f"api{i}")},
                stdout=logs, stderr=subprocess.STDOUT, start_new_session=True))
            urls.append(f"http://127.0.0.1:{port}")
        for i in range(2):
            stack.start_worker(env=machine(root, f"worker{i}"))
        for url in urls:
            wait_for(lambda url=url: _answers(f"{url}/healthz"), 90, 0.3, f"the API at {url}")
        yield stack, urls, root
    finally:
        for api in apis:
            api.terminate()
        for api in apis:
            api.wait(timeout=30)
        teardown()
        s3.stop()
        logs.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def job_body(dataset_id: str, seed: int = 5) -> dict:
    return {"base_model": TINY, "training_dataset_id": dataset_id,
            "method": {"variant": "sbora_fa", "r": 4, "alpha": 8, "dropout": 0.1},
            "hyperparameters": {"max_steps": 40, "batch_size": 8, "learning_rate": 0.01, "max_seq_len": 400,
                                "checkpoint_every": 5, "seed": seed}}


def finished(api: httpx.Client, job_id: str) -> dict:
    return wait_for(lambda: (j := api.get(f"/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and j,
                    300, 0.3, f"job {job_id} to end")


def worker_of(job_id: str) -> int:
    """Which of the stack's workers runs the job (their Celery nodes are w0@host, w1@host)."""
    from app.core.db import session_scope
    from app.models import Job

    with session_scope() as session:
        node = session.get(Job, job_id).worker_node or ""
    assert node.startswith("w") and f"@{socket.gethostname()}" in node, node
    return int(node.split("@")[0][1:])


def weights(api: httpx.Client, adapter_id: str) -> bytes:
    response = api.get(f"/adapters/{adapter_id}")
    assert response.status_code == 200, response.text
    return zipfile.ZipFile(io.BytesIO(response.content)).read("adapter_model.safetensors")


def test_two_machines_of_each_kind_share_only_the_services(cluster):
    stack, urls, root = cluster
    headers = {"Authorization": f"Bearer {stack.key('ops')}"}
    one, two = (httpx.Client(base_url=url, headers=headers, timeout=120) for url in urls)
    story = "The quick brown fox jumps over the lazy dog. " * 3
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": f"Story {i}: {story}"},
                                             {"role": "assistant", "content": f"Summary {i}: {story[:60]}"}]}) + "\n"
                    for i in range(32))
    uploaded = one.post("/datasets", files={"file": ("stories.jsonl", lines.encode())})
    assert uploaded.status_code == 201, uploaded.text
    dataset_id = uploaded.json()["id"]

    # Two jobs at once, one per worker; the reference is submitted through the other replica.
    reference = two.post("/jobs", json=job_body(dataset_id)).json()
    other = one.post("/jobs", json=job_body(dataset_id, seed=6)).json()
    wait_for(lambda: all(one.get(f"/jobs/{j['id']}").json()["status"] == "running" for j in (reference, other)),
             60, 0.2, "both jobs to start")
    assert {worker_of(reference["id"]), worker_of(other["id"])} == {0, 1}, "the jobs did not spread"
    reference, other = finished(one, reference["id"]), finished(one, other["id"])
    assert reference["status"] == other["status"] == "succeeded", (reference["error"], other["error"])

    # The same job again; its worker is killed after the first checkpoint.
    victim = one.post("/jobs", json=job_body(dataset_id)).json()
    wait_for(lambda: one.get(f"/jobs/{victim['id']}/events", params={"kind": "checkpoint"}).json()["data"], 120,
             0.05, "the first checkpoint")
    killed = worker_of(victim["id"])
    stack.kill_worker(stack.workers[killed])
    done = finished(two, victim["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    messages = [e["message"] for e in two.get(f"/jobs/{victim['id']}/events", params={"limit": 1000}).json()["data"]]
    assert any(m.startswith("fetched step-") and m.endswith("from the artifact store") for m in messages), messages
    assert weights(two, done["adapter_id"]) == weights(one, reference["adapter_id"]), "the resumed adapter differs"

    # Every adapter, from either replica: the same download, and generation with it.
    for adapter_id in (reference["adapter_id"], other["adapter_id"], done["adapter_id"]):
        assert weights(one, adapter_id) == weights(two, adapter_id)
        for api in (one, two):
            reply = api.post("/generate", json={"adapter_id": adapter_id, "prompt": "Story 3:", "max_new_tokens": 4})
            assert reply.status_code == 200, reply.text

    # Nothing was written to a local artifact directory; the surviving worker, which finished every
    # job, kept no scratch of them (the killed one's is what a crash leaves), nor the store their checkpoints.
    assert not [p for p in root.rglob("artifacts") if p.is_dir()]
    scratch_jobs = root / f"worker{1 - killed}" / "data" / "scratch" / "jobs"
    assert not scratch_jobs.exists() or not any(scratch_jobs.iterdir())
    from app.storage import get_store

    assert get_store().keys("jobs") == []
    one.close()
    two.close()
