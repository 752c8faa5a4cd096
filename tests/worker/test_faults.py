"""Faults the service survives without losing work: killed workers, a Redis that forgot everything,
an API restart, a full disk. Each test starts and kills the real components itself."""

from __future__ import annotations

import io
import json
import resource
import zipfile

import pytest
from fastapi.testclient import TestClient
from stack import make_stack, wait_for

TINY = "tiny-llama"
FAST_RECOVERY = {"SBORA_JOB_LEASE_S": "4", "SBORA_RECONCILE_INTERVAL_S": "1", "SBORA_QUEUED_STALE_S": "3"}


def long_chat_lines(n: int) -> bytes:
    story = "The quick brown fox jumps over the lazy dog. " * 3
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"Story {i}: {story}"},
                                            {"role": "assistant", "content": f"Summary {i}: {story[:60]}"}]}) + "\n"
                   for i in range(n)).encode()


@pytest.fixture(scope="module", params=["embedded", "production"])
def stack(request, tmp_path_factory, tiny_model_dir):
    stack, teardown = make_stack(request.param, tmp_path_factory.mktemp(f"faults-{request.param}"),
                                 [str(tiny_model_dir)], private_redis=True, extra_env=FAST_RECOVERY)
    yield stack
    teardown()


@pytest.fixture(scope="module")
def api(stack):
    from app.main import create_app

    holder = {"client": TestClient(create_app())}
    holder["client"].__enter__()
    yield holder
    holder["client"].__exit__(None, None, None)


@pytest.fixture(scope="module")
def headers(stack):
    return {"Authorization": f"Bearer {stack.key('ops')}"}


@pytest.fixture(scope="module")
def dataset_id(api, headers):
    response = api["client"].post("/datasets", headers=headers, files={"file": ("stories.jsonl", long_chat_lines(32))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job_body(dataset_id: str, **hp) -> dict:
    return {"base_model": TINY, "training_dataset_id": dataset_id,
            "method": {"variant": "sbora_fa", "r": 4, "alpha": 8, "dropout": 0.1},
            "hyperparameters": {"max_steps": 60, "batch_size": 8, "learning_rate": 0.01, "max_seq_len": 400,
                                "checkpoint_every": 5, "seed": 3, **hp}}


def get(api, headers, path, **params):
    return api["client"].get(path, headers=headers, params=params).json()


def wait_terminal(api, headers, job_id, timeout=240):
    return wait_for(lambda: (j := get(api, headers, f"/jobs/{job_id}"))["status"]
                    in ("succeeded", "failed", "cancelled") and j, timeout, 0.3, f"job {job_id} to end")


def factors(api, headers, adapter_id):
    from safetensors.torch import load

    response = api["client"].get(f"/adapters/{adapter_id}", headers=headers)
    assert response.status_code == 200, (adapter_id, response.status_code, response.text[:300])
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    return load(archive.read("adapter_model.safetensors"))


def test_worker_killed_mid_training_resumes_to_the_same_adapter(stack, api, headers, dataset_id):
    worker = stack.start_worker()
    reference = api["client"].post("/jobs", headers=headers, json=job_body(dataset_id)).json()
    reference = wait_terminal(api, headers, reference["id"])
    assert reference["status"] == "succeeded", reference["error"]

    victim = api["client"].post("/jobs", headers=headers, json=job_body(dataset_id)).json()
    wait_for(lambda: get(api, headers, f"/jobs/{victim['id']}/events", kind="checkpoint")["data"], 120, 0.05,
             "the first checkpoint")
    stack.kill_worker(worker)
    stopped_at = get(api, headers, f"/jobs/{victim['id']}")
    assert stopped_at["status"] == "running", "killed mid-run: the job must not have finished"

    stack.start_worker()
    done = wait_terminal(api, headers, victim["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    logs = [e["message"] for e in get(api, headers, f"/jobs/{victim['id']}/events", kind="log", limit=1000)["data"]]
    assert any(m.startswith("resumed from step-") for m in logs), logs

    a, b = factors(api, headers, reference["adapter_id"]), factors(api, headers, done["adapter_id"])
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "resumed adapter differs"
    stack.stop_workers()


def test_api_restart_loses_nothing(stack, api, headers, dataset_id):
    from app.main import create_app

    stack.start_worker()
    job = api["client"].post("/jobs", headers=headers, json=job_body(dataset_id, max_steps=80)).json()
    wait_for(lambda: get(api, headers, f"/jobs/{job['id']}")["progress"]["step"] >= 1, 120, 0.1, "a first step")
    api["client"].__exit__(None, None, None)  # the API goes away mid-job ...
    api["client"] = TestClient(create_app())  # ... and comes back
    api["client"].__enter__()
    seen = get(api, headers, f"/jobs/{job['id']}")["progress"]["step"]
    wait_for(lambda: get(api, headers, f"/jobs/{job['id']}")["progress"]["step"] > seen, 60, 0.2, "more progress")
    assert wait_terminal(api, headers, job["id"])["status"] == "succeeded"
    stack.stop_workers()


def test_broker_that_lost_its_queue_is_refilled_from_the_database(stack, api, headers, dataset_id):
    if stack.redis is None:
        pytest.skip("the embedded broker keeps its messages on disk; this is about Redis")
    before = get(api, headers, "/adapters")["total"]
    jobs = [api["client"].post("/jobs", headers=headers, json=job_body(dataset_id, max_steps=3, seed=i)).json()
            for i in range(3)]
    stack.redis.restart()  # every queued message is gone
    stack.start_worker()
    finished = [wait_terminal(api, headers, j["id"]) for j in jobs]
    assert [j["status"] for j in finished] == ["succeeded"] * 3
    assert [j["attempts"] for j in finished] == [1, 1, 1], "each job ran exactly once"
    assert get(api, headers, "/adapters")["total"] == before + 3
    stack.stop_workers()


def test_full_disk_fails_the_job_clearly_and_the_worker_takes_the_next(stack, api, headers, dataset_id):
    if stack.flavour != "production":
        pytest.skip("with SQLite the database file would hit the same limit; the store is what is under test")
    # Files this worker writes may not exceed 100 KB: a large adapter's checkpoint cannot be written.
    stack.start_worker(rlimits={resource.RLIMIT_FSIZE: 100 * 1024}, quiet=True)
    big = api["client"].post("/jobs", headers=headers,
                             json={**job_body(dataset_id, max_steps=2, checkpoint_every=1),
                                   "method": {"variant": "sbora_fa", "r": 64, "alpha": 64}}).json()
    failed = wait_terminal(api, headers, big["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "disk_full", failed["error"]
    assert "space" in failed["error"]["message"]
    small = api["client"].post("/jobs", headers=headers, json=job_body(dataset_id, max_steps=2)).json()
    assert wait_terminal(api, headers, small["id"])["status"] == "succeeded"
    stack.stop_workers()


def test_out_of_memory_fails_the_job_clearly_and_the_worker_takes_the_next(stack, api, headers, dataset_id):
    if stack.flavour != "embedded":
        pytest.skip("memory is the flavour-independent part; the embedded run covers it")
    # The worker (and its pool child) may map at most 2 GB of data: a small job needs about 0.6 GB,
    # a batch of 1024 sequences of ~450 tokens needs several GB, so its allocations really fail.
    stack.start_worker(rlimits={resource.RLIMIT_DATA: 2 * 1024**3}, quiet=True)
    story = "The quick brown fox jumps over the lazy dog. " * 4
    lines = "".join(json.dumps({"messages": [{"role": "user", "content": f"Story {i}: {story}"},
                                             {"role": "assistant", "content": story}]}) + "\n" for i in range(1024))
    wide = api["client"].post("/datasets", headers=headers, files={"file": ("wide.jsonl", lines.encode())}).json()
    big = api["client"].post("/jobs", headers=headers, json=job_body(wide["id"], max_steps=1, batch_size=1024,
                                                                     max_seq_len=512)).json()
    failed = wait_terminal(api, headers, big["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory", failed["error"]
    assert "batch_size" in failed["error"]["message"]
    worker = stack.workers[-1]
    small = api["client"].post("/jobs", headers=headers, json=job_body(dataset_id, max_steps=2)).json()
    assert wait_terminal(api, headers, small["id"])["status"] == "succeeded"
    assert worker.poll() is None  # the same worker process, still up
    stack.stop_workers()
