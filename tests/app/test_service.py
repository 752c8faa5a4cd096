"""The job server end to end, on both stacks: upload, train on a real worker, download, generate, cancel."""

from __future__ import annotations

import io
import json
import os
import zipfile

import pytest
import torch
from stack import chat_lines, wait_for

from sbora_core.method.adapter_io import apply_adapter, load_adapter
from sbora_core.method.models import load_base_model

TINY = "tiny-llama"


def job_body(dataset_id: str, **hyperparameters) -> dict:
    return {
        "base_model": TINY,
        "training_dataset_id": dataset_id,
        "method": {"variant": "sbora_fa", "r": 4, "alpha": 8},
        "hyperparameters": {"max_steps": 6, "batch_size": 4, "learning_rate": 0.01, "max_seq_len": 128,
                            "checkpoint_every": 3, **hyperparameters},
        "name": "colours",
    }


def wait_status(client, headers, job_id, statuses, timeout=180.0):
    def done():
        job = client.get(f"/jobs/{job_id}", headers=headers).json()
        return job if job["status"] in statuses else None
    return wait_for(done, timeout, interval=0.5, what=f"job {job_id} to reach {statuses}")


def test_health_and_models(client, alice):
    assert client.get("/healthz").json() == {"status": "ok"}
    # Ready once the stack's worker has sent its first heartbeat and the engine has loaded the model.
    ready = wait_for(lambda: (r := client.get("/readyz")).status_code == 200 and r, 60, 0.2, "readiness")
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "store": "ok", "workers": "ok",
                                      "engine": "ok"}
    from app.engine_process import get_engine_process

    assert get_engine_process().warm == {TINY}  # loaded at start, before any request asked
    models = client.get("/models", headers=alice).json()
    assert [m["id"] for m in models] == [TINY]
    assert models[0]["linear_modules"]["q_proj"] == {"d_out": 64, "d_in": 64}


def test_requests_need_a_valid_key(client):
    assert client.get("/datasets").status_code == 401
    assert client.get("/datasets", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_dataset_upload_and_listing(client, alice, bob, dataset):
    assert dataset["records"] == 24 and dataset["format"] == "chat"
    assert dataset["stats"]["total_tokens"] > 0 and dataset["stats"]["steps_per_epoch"] == 6
    assert dataset["id"].startswith("ds_") and dataset["owner"].startswith("ten_")
    listed = client.get("/datasets", headers=alice).json()
    assert dataset["id"] in [d["id"] for d in listed["data"]]
    assert client.get(f"/datasets/{dataset['id']}", headers=bob).status_code == 404
    assert client.get("/datasets", headers=bob).json()["total"] == 0


def test_bad_dataset_answers_422_with_line_numbers(client, alice):
    body = chat_lines(3) + b'{"messages": [{"role": "robot", "content": "x"}]}\n{oops\n'
    response = client.post("/datasets", headers=alice, files={"file": ("bad.jsonl", body)})
    assert response.status_code == 422
    errors = response.json()["errors"]
    assert [e["line"] for e in errors] == [4, 5]
    assert "unknown role 'robot'" in errors[0]["message"] and "not JSON" in errors[1]["message"]


def test_job_validation_names_the_field(client, alice, bob, dataset):
    def post(body, headers=alice):
        return client.post("/jobs", headers=headers, json=body)

    response = post({**job_body(dataset["id"]), "base_model": "gpt-9"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "base_model"]
    assert TINY in response.json()["detail"][0]["msg"]
    response = post({**job_body(dataset["id"]), "method": {"variant": "sbora_fa", "r": 65}})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "method", "r"]
    response = post({**job_body(dataset["id"]), "method": {"target_modules": ["qkv"]}})
    assert response.status_code == 422 and "q_proj" in response.json()["detail"][0]["msg"]
    response = post(job_body(dataset["id"]), headers=bob)  # alice's dataset
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "training_dataset_id"]
    response = post({**job_body(dataset["id"]), "hyperparameters": {"learning_rate": -1}})
    assert response.status_code == 422


def test_train_download_generate(client, alice, bob, dataset, tiny_model_dir, tmp_path):
    created = client.post("/jobs", headers=alice, json=job_body(dataset["id"]))
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["status"] == "queued" and job["id"].startswith("job_")
    assert client.get(f"/jobs/{job['id']}", headers=bob).status_code == 404

    done = wait_status(client, alice, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["step"] == 6 and done["progress"]["total_steps"] == 6
    assert done["progress"]["tokens_per_s"] > 0 and done["adapter_id"].startswith("ad_")

    events = client.get(f"/jobs/{job['id']}/events", headers=alice, params={"kind": "metric"}).json()["data"]
    assert [e["data"]["step"] for e in events] == [1, 2, 3, 4, 5, 6]
    # Training shares the machine politely: half the cores for torch, below the API's CPU priority.
    logs = [e["message"] for e in client.get(f"/jobs/{job['id']}/events", headers=alice,
                                              params={"kind": "log"}).json()["data"]]
    assert f"{max(1, (os.cpu_count() or 2) // 2)} torch threads at nice 10" in logs
    stream = client.get(f"/jobs/{job['id']}/events/stream", headers=alice)
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert "event: metric" in stream.text and 'event: end\ndata: {"status": "succeeded"}' in stream.text

    adapter_id = done["adapter_id"]
    meta = client.get(f"/adapters/{adapter_id}/metadata", headers=alice).json()
    assert meta["variant"] == "sbora_fa" and meta["r"] == 4 and meta["job_id"] == job["id"]
    assert meta["metrics"]["steps"] == 6
    download = client.get(f"/adapters/{adapter_id}", headers=alice)
    assert download.status_code == 200 and download.headers["etag"] == f'"{meta["sha256"]}"'
    again = client.get(f"/adapters/{adapter_id}", headers={**alice, "If-None-Match": download.headers["etag"]})
    assert again.status_code == 304
    assert client.get(f"/adapters/{adapter_id}", headers=bob).status_code == 404

    # The downloaded adapter loads with sbora_core and changes the tiny model's outputs.
    zipfile.ZipFile(io.BytesIO(download.content)).extractall(tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.trainable_params() == meta["trainable_params"]
    base = load_base_model(str(tiny_model_dir), device="cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base.model(input_ids=ids).logits
    apply_adapter(base.model, adapter, base.fingerprint)
    assert not torch.allclose(base.model(input_ids=ids).logits, before)

    peft = client.get(f"/adapters/{adapter_id}", headers=alice, params={"format": "peft"})
    names = zipfile.ZipFile(io.BytesIO(peft.content)).namelist()
    assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads(zipfile.ZipFile(io.BytesIO(peft.content)).read("adapter_config.json"))["peft_type"] == "LORA"

    listed = client.get("/adapters", headers=alice, params={"base_model": TINY}).json()
    assert adapter_id in [a["id"] for a in listed["data"]]

    # Generation with and without the adapter, greedy and reproducible.
    body = {"messages": [{"role": "user", "content": "Item 3: which colour?"}], "max_new_tokens": 12}
    plain = client.post("/generate", headers=alice, json=body).json()
    tuned = client.post("/generate", headers=alice, json={**body, "adapter_id": adapter_id}).json()
    assert tuned["adapter_ids"] == [adapter_id] and tuned["base_model"] == TINY
    assert tuned["completion_tokens"] > 0
    assert client.post("/generate", headers=alice, json={**body, "adapter_id": adapter_id}).json() == tuned
    assert plain["text"] != tuned["text"] or plain["completion_tokens"] != tuned["completion_tokens"]
    streamed = client.post("/generate", headers=alice, json={**body, "adapter_id": adapter_id, "stream": True})
    pieces = [json.loads(line[6:])["text"] for line in streamed.text.splitlines()
              if line.startswith("data: ") and '"text"' in line and "prompt_tokens" not in line]
    assert "".join(pieces) == tuned["text"]
    assert client.post("/generate", headers=bob, json={**body, "adapter_id": adapter_id}).status_code == 404


def test_cancel_a_running_job(client, alice, dataset):
    job = client.post("/jobs", headers=alice, json=job_body(dataset["id"], max_steps=100000)).json()
    wait_for(lambda: client.get(f"/jobs/{job['id']}", headers=alice).json()["progress"].get("step", 0) >= 1,
             180, 0.2, "the long job to take a step")
    cancelled = client.post(f"/jobs/{job['id']}/cancel", headers=alice)
    assert cancelled.status_code == 200
    done = wait_status(client, alice, job["id"], {"cancelled", "failed", "succeeded"}, timeout=60)
    assert done["status"] == "cancelled" and done["adapter_id"] is None
    assert client.post(f"/jobs/{job['id']}/cancel", headers=alice).status_code == 409
    listed = client.get("/jobs", headers=alice, params={"status": "cancelled"}).json()
    assert job["id"] in [j["id"] for j in listed["data"]]


def test_path_like_and_unknown_ids_are_404(client, alice):
    for path in ("/jobs/..%2F..%2Fetc%2Fpasswd", "/adapters/ad_000000000000000000000000", "/datasets/ds_x"):
        assert client.get(path, headers=alice).status_code == 404, path


def test_generation_survives_a_crashed_engine_process(client, alice):
    """The engine runs in a child process: if it dies, requests in flight get 503 with Retry-After,
    and the next request starts a new engine that answers as before."""
    import os
    import signal
    import threading

    from app.engine_process import get_engine_process

    body = {"prompt": "The colour is", "max_new_tokens": 6}
    before = client.post("/generate", headers=alice, json=body)
    assert before.status_code == 200, before.text
    engine = get_engine_process()
    answers = []
    caller = threading.Thread(target=lambda: answers.append(client.post(
        "/generate", headers=alice, json={"prompt": "A long story:", "max_new_tokens": 480})))
    caller.start()
    wait_for(lambda: engine.inflight or answers, 30, 0.005, "the long request to reach the engine")
    assert not answers, answers[0].text
    os.kill(engine.process.pid, signal.SIGKILL)
    caller.join(timeout=60)
    assert answers and answers[0].status_code == 503, answers and answers[0].text
    assert answers[0].headers["retry-after"] == "1" and "retry" in answers[0].json()["detail"]
    # The watchdog starts a new engine process on its own, before any request asks for one.
    import app.engine_process as engines

    wait_for(lambda: engines._engine is not None and engines._engine.process.pid != engine.process.pid
             and engines._engine.alive(), 30, 0.1, "the watchdog to start a new engine")

    after = client.post("/generate", headers=alice, json=body)
    assert after.status_code == 200, after.text
    assert get_engine_process().process.pid != engine.process.pid
    assert after.json()["text"] == before.json()["text"]


def test_embedded_broker_keeps_its_files_in_the_data_directory(stack):
    """kombu's filesystem transport writes exchange tables to ./control unless told otherwise."""
    from stack import ROOT

    if stack.flavour != "embedded":
        pytest.skip("only the embedded broker keeps files")
    assert any((stack.data_dir / "broker" / "control").iterdir())
    assert not (ROOT / "control").exists()
