"""Tenants, keys, quotas and hostile input: every route, every bad file, nothing stored is harmed."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from stack import chat_lines, wait_for

TINY = "tiny-llama"


@pytest.fixture(scope="module")
def alice_adapter(client, alice, dataset):
    body = {"base_model": TINY, "training_dataset_id": dataset["id"], "method": {"r": 4, "alpha": 8},
            "hyperparameters": {"max_steps": 2, "batch_size": 4, "max_seq_len": 128}}
    job = client.post("/jobs", headers=alice, json=body).json()
    done = wait_for(lambda: (j := client.get(f"/jobs/{job['id']}", headers=alice).json())["status"]
                    in ("succeeded", "failed") and j, 180, 0.5, "training")
    assert done["status"] == "succeeded", done["error"]
    return job["id"], done["adapter_id"]


def test_another_tenants_ids_answer_404_on_every_route(client, alice, bob, dataset, alice_adapter):
    job_id, adapter_id = alice_adapter
    ds = dataset["id"]
    routes = [
        ("GET", f"/datasets/{ds}", None), ("DELETE", f"/datasets/{ds}", None),
        ("GET", f"/jobs/{job_id}", None), ("POST", f"/jobs/{job_id}/cancel", None),
        ("GET", f"/jobs/{job_id}/events", None), ("GET", f"/jobs/{job_id}/events/stream", None),
        ("GET", f"/adapters/{adapter_id}", None), ("GET", f"/adapters/{adapter_id}?format=peft", None),
        ("GET", f"/adapters/{adapter_id}/metadata", None), ("DELETE", f"/adapters/{adapter_id}", None),
        ("POST", "/generate", {"prompt": "hi", "adapter_id": adapter_id}),
        ("POST", "/v1/completions", {"model": adapter_id, "prompt": "hi"}),
        ("POST", "/v1/chat/completions", {"model": adapter_id, "messages": [{"role": "user", "content": "hi"}]}),
    ]
    for method, path, body in routes:
        response = client.request(method, path, headers=bob, json=body)
        assert response.status_code == 404, (method, path, response.status_code, response.text)
        assert client.request(method, path, json=body).status_code == 401, (method, path)
    # Bob's listings are empty, and alice's objects are intact.
    for path in ("/datasets", "/jobs", "/adapters"):
        assert client.get(path, headers=bob).json()["total"] == 0
    assert adapter_id not in [m["id"] for m in client.get("/v1/models", headers=bob).json()["data"]]
    assert client.get(f"/adapters/{adapter_id}/metadata", headers=alice).status_code == 200
    assert client.get(f"/datasets/{ds}", headers=alice).status_code == 200


def test_revoked_key_is_refused(client, stack):
    key = stack.key("carol")
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/datasets", headers=headers).status_code == 200
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.core.security import hash_key, revoke_api_key
    from app.models import ApiKey

    with session_scope() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(key)))
        assert revoke_api_key(session, key_id)
    assert client.get("/datasets", headers=headers).status_code == 401


def _zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.jsonl", b"0" * (20 * 1024 * 1024))
    return buffer.getvalue()


BAD_DATASETS = {
    "not-json": b"this is not json\n",
    "not-utf8": b'{"prompt": "caf\xe9", "completion": "x"}\n',
    "binary": bytes(range(256)) * 64,
    "nested": (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b', "completion": "x"}\n'),
    "wrong-types": b'{"prompt": 5, "completion": ["x"]}\n',
    "empty": b"",
    "zip-bomb": _zip_bomb(),
    "array-of-junk": b"[1, 2, 3]",
    "one-huge-line": b'{"prompt": "' + b"a" * (100 * 1024 * 1024) + b'", "completion": "x"}\n',
}


def _snapshot(client, headers):
    return {d["id"]: d["sha256"] for d in client.get("/datasets", headers=headers, params={"limit": 200}).json()["data"]}


def test_hostile_datasets_answer_4xx_and_change_nothing(client, alice, dataset):
    before = _snapshot(client, alice)
    for name, body in BAD_DATASETS.items():
        response = client.post("/datasets", headers=alice, files={"file": (f"{name}.jsonl", body)})
        assert response.status_code in (413, 422), (name, response.status_code)
        assert response.json()["detail"], name
    assert _snapshot(client, alice) == before
    # Still serving: ready once the module's worker has reported in and the engine has loaded the model.
    wait_for(lambda: client.get("/readyz").status_code == 200, 120, 0.5, "readiness after the uploads")


def test_hostile_requests_answer_4xx(client, alice, dataset):
    job = {"base_model": TINY, "training_dataset_id": dataset["id"]}
    bad_jobs = [
        {**job, "method": {"r": -4}}, {**job, "method": {"r": 10**9}}, {**job, "method": {"r": 65}},
        {**job, "method": {"variant": "sbora_fb", "r": 33, "target_modules": ["k_proj"]}},
        {**job, "method": {"target_modules": ["attn.c_attn"]}}, {**job, "method": {"target_modules": []}},
        {**job, "hyperparameters": {"batch_size": 0}}, {**job, "hyperparameters": {"learning_rate": 5}},
        {**job, "training_dataset_id": "../../etc/passwd"}, {**job, "base_model": "../../etc"},
        {**job, "quantization": "fp3"}, {**job, "unknown_field": 1}, {"training_dataset_id": None},
    ]
    for body in bad_jobs:
        response = client.post("/jobs", headers=alice, json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["detail"]
    bad_generate = [
        {"prompt": "hi", "max_new_tokens": 10**6}, {"prompt": "hi", "max_new_tokens": 0},
        {"prompt": "word " * 600, "max_new_tokens": 10, "base_model": TINY},  # longer than the 512-token context
        {"prompt": "hi", "adapter_id": "../../etc/passwd"}, {"prompt": "hi", "adapter_id": ["ad_1", "ad_1"]},
        {}, {"prompt": "hi", "messages": [{"role": "user", "content": "x"}]},
        {"messages": [{"role": "robot", "content": "x"}]}, {"prompt": "hi", "temperature": -1},
    ]
    for body in bad_generate:
        response = client.post("/generate", headers=alice, json=body)
        assert response.status_code in (404, 422), (body, response.status_code, response.text)
    for path in ("/jobs/..%2F..%2Fetc%2Fpasswd", "/datasets/ds_%2e%2e%2fetc", "/adapters/ad_zzz/metadata",
                 "/jobs/job_000000000000000000000000/events"):
        assert client.get(path, headers=alice).status_code == 404, path
    # Still serving: ready once the module's worker has reported in and the engine has loaded the model.
    wait_for(lambda: client.get("/readyz").status_code == 200, 120, 0.5, "readiness after the uploads")


def test_upload_size_limit_streams_and_refuses(client, alice):
    from app.core.config import get_settings

    settings = get_settings()
    saved = settings.max_upload_bytes
    settings.max_upload_bytes = 1000
    try:
        response = client.post("/datasets", headers=alice, files={"file": ("big.jsonl", chat_lines(100))})
    finally:
        settings.max_upload_bytes = saved
    assert response.status_code == 413 and "SBORA_MAX_UPLOAD_BYTES" in response.json()["detail"]


def test_quotas_answer_429_and_413(client, stack, dataset):
    from app.core.config import get_settings

    headers = {"Authorization": f"Bearer {stack.key('dave')}"}
    settings = get_settings()
    saved = settings.max_concurrent_jobs, settings.max_stored_bytes
    try:
        settings.max_stored_bytes = len(chat_lines(24)) + 10
        first = client.post("/datasets", headers=headers, files={"file": ("a.jsonl", chat_lines(24))})
        assert first.status_code == 201
        second = client.post("/datasets", headers=headers, files={"file": ("b.jsonl", chat_lines(24, offset=50))})
        assert second.status_code == 413 and "quota" in second.json()["detail"]

        settings.max_concurrent_jobs = 1
        body = {"base_model": TINY, "training_dataset_id": first.json()["id"],
                "hyperparameters": {"max_steps": 100000, "batch_size": 4, "max_seq_len": 128}}
        running = client.post("/jobs", headers=headers, json=body)
        assert running.status_code == 201
        refused = client.post("/jobs", headers=headers, json=body)
        assert refused.status_code == 429 and "limit per tenant is 1" in refused.json()["detail"]
        assert refused.headers["retry-after"]
        client.post(f"/jobs/{running.json()['id']}/cancel", headers=headers)
        wait_for(lambda: client.get(f"/jobs/{running.json()['id']}", headers=headers).json()["status"] == "cancelled",
                 120, 0.5, "cancellation")
    finally:
        settings.max_concurrent_jobs, settings.max_stored_bytes = saved


def test_corrupted_adapter_is_detected_and_reported(client, alice, stack, alice_adapter):
    from app.core.db import session_scope
    from app.models import Adapter
    from app.storage import get_store

    _, adapter_id = alice_adapter
    with session_scope() as session:
        key = session.get(Adapter, adapter_id).storage_key
    weights = get_store().local_file(f"{key}/adapter_model.safetensors")
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + b"CORRUPT!")
    try:
        from app.engine_process import reset_engines

        reset_engines()  # a fresh engine must load (and verify) the adapter from the store
        response = client.post("/generate", headers=alice, json={"prompt": "hi", "adapter_id": adapter_id})
        assert response.status_code == 500 and "sha256" in response.json()["detail"]
    finally:
        weights.write_bytes(original)
    assert client.post("/generate", headers=alice, json={"prompt": "hi", "adapter_id": adapter_id,
                                                         "max_new_tokens": 2}).status_code == 200
    assert json.loads(client.get(f"/adapters/{adapter_id}/metadata", headers=alice).text)["id"] == adapter_id
