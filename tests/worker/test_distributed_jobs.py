"""Jobs on several devices of one machine through the service: a real Celery worker offering two
(CPU) devices starts each job's ranks with torchrun; PostgreSQL and Redis as in production."""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from stack import make_stack, wait_for

TINY = "tiny-llama"
TWO_DEVICES = {"SBORA_WORKER_DEVICES": "2", "SBORA_JOB_LEASE_S": "30", "SBORA_RECONCILE_INTERVAL_S": "1",
               "SBORA_QUEUED_STALE_S": "3", "SBORA_ENGINE_WARM_START": "0", "SBORA_DISTRIBUTED_STEP_TIMEOUT_S": "20"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    stack, teardown = make_stack("production", tmp_path_factory.mktemp("distributed"), [str(tiny_model_dir)],
                                 extra_env=TWO_DEVICES)
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
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": f"Item {i}: which colour?"},
                                             {"role": "assistant", "content": f"The colour is {c}."}]}) + "\n"
                    for i, c in enumerate(["red", "green", "blue", "gold"] * 8))
    response = client.post("/datasets", headers=headers, files={"file": ("colours.jsonl", lines.encode())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job_body(dataset_id: str, devices: int = 2, **hp) -> dict:
    return {"base_model": TINY, "training_dataset_id": dataset_id, "resources": {"devices": devices},
            "method": {"variant": "sbora_fa", "r": 4, "alpha": 8, "dropout": 0.0},
            "hyperparameters": {"max_steps": 8, "batch_size": 5, "learning_rate": 0.01, "max_seq_len": 64,
                                "checkpoint_every": 2, "seed": 3, **hp}}


def get(client, headers, path, **params):
    return client.get(path, headers=headers, params=params).json()


def wait_terminal(client, headers, job_id, timeout=180):
    return wait_for(lambda: (j := get(client, headers, f"/jobs/{job_id}"))["status"]
                    in ("succeeded", "failed", "cancelled") and j, timeout, 0.3, f"job {job_id} to end")


def adapter_files(client, headers, adapter_id) -> tuple[dict, dict]:
    from safetensors.torch import load

    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/adapters/{adapter_id}", headers=headers).content))
    return json.loads(archive.read("adapter_config.json")), load(archive.read("adapter_model.safetensors"))


def assert_same_factors(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        if tensor.is_floating_point():
            assert float((got[name] - tensor).abs().max() / tensor.abs().max()) < 1e-5, name
        else:  # the index sets
            assert (got[name] == tensor).all(), name


def ranks_of(stack, job_id: str) -> list[int]:
    """Pids of the job's ranks still running on this machine."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"sbora_core.training.rank" in cmdline and job_id.encode() in cmdline \
                and b"torch.distributed.run" not in cmdline:  # torchrun names the ranks' module too
            alive.append(int(pid))
    return alive


@pytest.fixture(scope="module")
def one_device_job(stack, client, headers, dataset_id):
    """The job on one device, uninterrupted: what every run on two must give."""
    stack.start_worker()
    job = client.post("/jobs", headers=headers, json=job_body(dataset_id, devices=1)).json()
    done = wait_terminal(client, headers, job["id"])
    assert done["status"] == "succeeded", done["error"]
    stack.stop_workers()
    return done


def _two_device_worker_alive() -> bool:
    from app.core.db import session_scope
    from app.services import workers

    with session_scope() as session:
        return any(w.devices == 2 for w in workers.live_workers(session))


def test_a_job_on_two_devices_survives_a_killed_rank_and_ends_with_the_one_device_adapter(stack, client, headers,
                                                                                         dataset_id, one_device_job):
    stack.start_worker()
    created = client.post("/jobs", headers=headers, json=job_body(dataset_id))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["resources"] == {"devices": 2, "nodes": 1, "sharding": "none"}
    wait_for(lambda: get(client, headers, f"/jobs/{job['id']}/events", kind="checkpoint")["data"], 120, 0.05,
             "the first checkpoint")
    pid_file = stack.data_dir / "scratch" / "ranks" / job["id"] / "ranks" / "1.pid"
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    done = wait_terminal(client, headers, job["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    statuses = [e["message"] for e in get(client, headers, f"/jobs/{job['id']}/events", kind="status")["data"]]
    assert any(m.startswith("queued: rank 1 died") for m in statuses), statuses
    logs = [e["message"] for e in get(client, headers, f"/jobs/{job['id']}/events", kind="log", limit=1000)["data"]]
    assert any(m.startswith("resumed from step-") for m in logs), logs
    assert any("2 ranks, sharding none" in m for m in logs), logs
    assert done["progress"]["step"] == 8 and done["progress"]["tokens"] == one_device_job["progress"]["tokens"]
    # The same adapter, in the same kind of file, as the job on one device.
    config, factors = adapter_files(client, headers, done["adapter_id"])
    want_config, want = adapter_files(client, headers, one_device_job["adapter_id"])
    assert_same_factors(factors, want)
    assert config["variant"] == want_config["variant"] and config["r"] == want_config["r"]
    openai_job = get(client, headers, f"/v1/fine_tuning/jobs/{done['id']}")
    assert openai_job["method"]["sbora"]["resources"] == {"devices": 2, "nodes": 1, "sharding": "none"}
    assert ranks_of(stack, job["id"]) == []
    stack.stop_workers()


def test_requests_no_worker_could_run_are_refused_and_cancel_stops_every_rank(stack, client, headers, dataset_id):
    stack.start_worker()
    wait_for(_two_device_worker_alive, 30, 0.2, "the worker's heartbeat")
    before = get(client, headers, "/jobs")["total"]
    for resources, field in (({"devices": 4}, "devices"), ({"nodes": 2}, "nodes"), ({"sharding": "half"}, "sharding")):
        response = client.post("/jobs", headers=headers, json={**job_body(dataset_id), "resources": resources})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "resources", field], response.text
    openai_body = {"model": TINY, "training_file": dataset_id,
                   "method": {"type": "sbora", "sbora": {"resources": {"devices": 4}}}}
    response = client.post("/v1/fine_tuning/jobs", headers=headers, json=openai_body)
    assert response.status_code == 422 and response.json()["error"]["param"] == "method.sbora.resources.devices"
    assert get(client, headers, "/jobs")["total"] == before, "a refused request stores nothing"

    job = client.post("/jobs", headers=headers, json=job_body(dataset_id, max_steps=500)).json()
    wait_for(lambda: get(client, headers, f"/jobs/{job['id']}")["progress"].get("step", 0) >= 1, 120, 0.1,
             "a first step")
    assert len(ranks_of(stack, job["id"])) == 2
    assert client.post(f"/jobs/{job['id']}/cancel", headers=headers).status_code == 200
    done = wait_terminal(client, headers, job["id"], timeout=60)
    assert done["status"] == "cancelled" and done["progress"]["step"] < 500
    wait_for(lambda: ranks_of(stack, job["id"]) == [], 10, 0.2, "every rank to stop")
    stack.stop_workers()


def test_out_of_memory_on_a_rank_names_the_rank_and_its_device(stack, client, headers):
    # Each rank may map at most 2 GB, as the worker: half of 1024 rows of ~450 tokens needs several.
    stack.start_worker(rlimits={resource.RLIMIT_DATA: 2 * 1024**3})
    story = "The quick brown fox jumps over the lazy dog. " * 4
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": f"Story {i}: {story}"},
                                             {"role": "assistant", "content": story}]}) + "\n" for i in range(1024))
    wide = client.post("/datasets", headers=headers, files={"file": ("wide.jsonl", lines.encode())}).json()
    job = client.post("/jobs", headers=headers, json=job_body(wide["id"], max_steps=1, batch_size=1024,
                                                              max_seq_len=512)).json()
    failed = wait_terminal(client, headers, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory", failed["error"]
    assert "rank " in failed["error"]["message"] and "(cpu)" in failed["error"]["message"], failed["error"]
    assert ranks_of(stack, job["id"]) == []
    stack.stop_workers()
