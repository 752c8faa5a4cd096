"""What a tenant sees of a job: UTC timestamps with a zone, a `cancelling` state while the worker stops,
no server paths in events or errors; and bad chat input answers 4xx, never 5xx."""

from __future__ import annotations

import re
from datetime import datetime

import httpx
from stack import train_tiny_adapter, wait_for

TINY = "tiny-llama"
UTC_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def long_job(dataset_id: str) -> dict:
    return {"base_model": TINY, "training_dataset_id": dataset_id, "method": {"r": 4, "alpha": 8},
            "hyperparameters": {"max_steps": 400, "batch_size": 4, "max_seq_len": 128, "checkpoint_every": 200}}


def test_every_timestamp_is_utc_with_a_zone(client, alice, dataset):
    created = client.post("/jobs", headers=alice, json={**long_job(dataset["id"]),
                                                        "hyperparameters": {"max_steps": 1}}).json()
    fetched = client.get(f"/jobs/{created['id']}", headers=alice).json()
    listed = client.get("/datasets", headers=alice).json()["data"][0]
    events = client.get(f"/jobs/{created['id']}/events", headers=alice).json()["data"]
    stamps = [created["created_at"], fetched["created_at"], fetched["updated_at"], listed["created_at"],
              events[0]["created_at"]]
    assert all(UTC_Z.match(s) for s in stamps), stamps
    assert created["created_at"] == fetched["created_at"]  # the same instant, written the same way
    assert datetime.fromisoformat(fetched["created_at"]).utcoffset().total_seconds() == 0


def test_cancelling_a_running_job_says_cancelling_until_the_worker_stops(client, alice, dataset):
    job = client.post("/jobs", headers=alice, json=long_job(dataset["id"])).json()
    wait_for(lambda: client.get(f"/jobs/{job['id']}", headers=alice).json()["progress"]["step"] >= 1, 120, 0.1,
             "a first step")
    answer = client.post(f"/jobs/{job['id']}/cancel", headers=alice)
    assert answer.status_code == 200 and answer.json()["status"] == "cancelling"
    assert client.post(f"/jobs/{job['id']}/cancel", headers=alice).json()["status"] in ("cancelling", "cancelled")
    done = wait_for(lambda: (j := client.get(f"/jobs/{job['id']}", headers=alice).json())["status"] == "cancelled"
                    and j, 60, 0.2, "the worker to stop")
    assert done["finished_at"] is not None
    statuses = [e["data"]["status"] for e in client.get(f"/jobs/{job['id']}/events", headers=alice,
                                                         params={"kind": "status"}).json()["data"]]
    assert statuses == ["queued", "running", "cancelling", "cancelled"]
    assert client.get("/jobs", headers=alice, params={"status": "cancelling"}).status_code == 200


def test_what_an_unfinished_job_uses_stays_until_it_ends(client, alice, dataset):
    start = train_tiny_adapter(client, alice, dataset["id"])["adapter_id"]
    job = client.post("/jobs", headers=alice, json={**long_job(dataset["id"]), "init_adapter_id": start}).json()
    for path in (f"/adapters/{start}", f"/datasets/{dataset['id']}"):
        refused = client.delete(path, headers=alice)
        assert refused.status_code == 409 and "unfinished job" in refused.text, (path, refused.text)
    assert job["id"] in client.delete(f"/adapters/{start}", headers=alice).text
    assert client.get(f"/adapters/{start}", headers=alice).status_code == 200
    client.post(f"/jobs/{job['id']}/cancel", headers=alice)
    wait_for(lambda: client.get(f"/jobs/{job['id']}", headers=alice).json()["status"] == "cancelled", 60, 0.2,
             "the job to stop")
    assert client.delete(f"/adapters/{start}", headers=alice).status_code == 204
    assert client.get(f"/adapters/{start}", headers=alice).status_code == 404


def test_events_and_errors_name_no_server_path(client, alice, dataset, stack, tiny_model_dir):
    job = client.post("/jobs", headers=alice, json={**long_job(dataset["id"]),
                                                    "hyperparameters": {"max_steps": 2, "max_seq_len": 128}}).json()
    wait_for(lambda: client.get(f"/jobs/{job['id']}", headers=alice).json()["status"] == "succeeded", 120, 0.3,
             "the job")
    text = " ".join(e["message"] for e in client.get(f"/jobs/{job['id']}/events", headers=alice,
                                                      params={"limit": 1000}).json()["data"])
    assert "loaded tiny-llama" in text  # the model by its name ...
    for server_path in (str(stack.data_dir), str(tiny_model_dir), str(tiny_model_dir.parent)):
        assert server_path not in text  # ... not by where it lives


def test_empty_or_unrenderable_chats_answer_422_and_the_connection_lives_on(live, alice, stack):
    with httpx.Client(base_url=live.url, headers=alice, timeout=120) as http:
        for stream in (False, True):
            empty = http.post("/generate", json={"messages": [], "max_new_tokens": 4, "stream": stream})
            assert empty.status_code == 422, empty.text
            assert empty.json()["detail"][0]["loc"][-1] == "messages"
        # The same keep-alive connection still serves the next request.
        fine = http.post("/generate", json={"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2})
        assert fine.status_code == 200, fine.text
