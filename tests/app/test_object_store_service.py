"""The service on an S3-compatible object store (a real server process): uploads, downloads and
generation go through it; presigned downloads redirect; a store that goes away answers 503 with
Retry-After and loses nothing; an object altered in the store is refused, never served."""

from __future__ import annotations

import hashlib
import shutil

import httpx
import pytest
from object_store import ObjectStoreServer, Relay
from stack import chat_lines, clear_caches, free_port, make_stack, train_tiny_adapter, wait_for


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    # Presigned URLs are fetched below, and moto checks no signature in a query string: no credential checks.
    server = ObjectStoreServer(tmp_path_factory.mktemp("s3"), check_credentials=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bucket(s3):
    return s3.new_bucket()


# tests/app/conftest.py's `client` and `alice` run over this module's stack.
@pytest.fixture(scope="module")
def stack(s3, bucket, tmp_path_factory, tiny_model_dir):
    stack, teardown = make_stack("embedded", tmp_path_factory.mktemp("s3-service"), [str(tiny_model_dir)],
                                 extra_env={**s3.env(bucket), "SBORA_ENGINE_WARM_START": "0",
                                            "SBORA_QUEUED_STALE_S": "2", "SBORA_RECONCILE_INTERVAL_S": "1"})
    stack.start_worker()
    yield stack
    teardown()


@pytest.fixture(scope="module")
def adapter(client, alice):
    dataset = client.post("/datasets", headers=alice, files={"file": ("colours.jsonl", chat_lines(24))}).json()
    return train_tiny_adapter(client, alice, dataset["id"])["adapter_id"]


def object_key(*parts: str) -> str:
    return "/".join(("artifacts", *parts))


class ApiSettings:
    """The API's settings changed for one test, and put back (the worker process keeps its own)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch

    def change(self, **values: str) -> None:
        for name, value in values.items():
            self.monkeypatch.setenv(name, value)
        clear_caches()

    def restore(self) -> None:
        self.monkeypatch.undo()
        clear_caches()


@pytest.fixture
def api_settings(monkeypatch):
    settings = ApiSettings(monkeypatch)
    yield settings
    settings.restore()


def test_artifacts_live_in_the_bucket_and_come_back_through_the_api(s3, bucket, stack, client, alice, adapter):
    body = chat_lines(8)
    dataset = client.post("/datasets", headers=alice, files={"file": ("more.jsonl", body)}).json()
    head = s3.client().head_object(Bucket=bucket, Key=object_key("datasets", f"{dataset['id']}.data"))
    assert head["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()
    assert client.get(f"/v1/files/{dataset['id']}/content", headers=alice).content == body

    keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix=object_key("adapters", adapter))
            ["Contents"]}
    assert {object_key("adapters", adapter, n) for n in ("adapter_model.safetensors", "sparse.zip", "peft.zip")} <= keys
    download = client.get(f"/adapters/{adapter}", headers=alice)
    assert download.status_code == 200
    assert download.headers["etag"] == f'"{hashlib.sha256(download.content).hexdigest()}"'
    reply = client.post("/generate", headers=alice, json={"adapter_id": adapter, "prompt": "Red", "max_new_tokens": 3})
    assert reply.status_code == 200, reply.text
    assert not (stack.data_dir / "artifacts").exists(), "nothing goes to a local artifact directory"


def test_presigned_downloads_redirect_to_the_object(client, alice, adapter, api_settings):
    api_settings.change(SBORA_S3_PRESIGN_DOWNLOADS="1", SBORA_S3_PRESIGN_EXPIRY_S="60")
    streamed = client.get(f"/adapters/{adapter}?format=peft", headers=alice, follow_redirects=False)
    assert streamed.status_code == 307, streamed.text
    location = streamed.headers["location"]
    assert "X-Amz-Signature=" in location and f"adapters/{adapter}/peft.zip" in location
    direct = httpx.get(location)  # no API key: the signature is the permission
    assert direct.status_code == 200 and direct.content[:2] == b"PK"
    assert f'filename="{adapter}-peft.zip"' in direct.headers["content-disposition"]


def test_an_unreachable_store_answers_503_and_loses_nothing(client, alice, adapter, api_settings):
    before = client.get(f"/adapters/{adapter}", headers=alice).content
    datasets_before = client.get("/datasets", headers=alice).json()["total"]
    api_settings.change(SBORA_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
    upload = client.post("/datasets", headers=alice, files={"file": ("late.jsonl", chat_lines(8))})
    assert upload.status_code == 503 and upload.headers["retry-after"], upload.text
    assert "artifact store is unavailable" in upload.json()["detail"]
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "unreachable" in ready.json()["checks"]["store"]
    # A delete is a database change: it happens, and the objects it could not remove stay as space.
    doomed = client.get("/datasets", headers=alice).json()["data"][0]["id"]
    assert client.delete(f"/datasets/{doomed}", headers=alice).status_code == 204
    api_settings.restore()  # the store is back
    assert client.get("/datasets", headers=alice).json()["total"] == datasets_before - 1
    assert client.get(f"/adapters/{adapter}", headers=alice).content == before


def test_an_object_altered_in_the_store_is_never_served(s3, bucket, stack, client, alice, adapter):
    for name in ("sparse.zip", "adapter_model.safetensors"):
        key = object_key("adapters", adapter, name)
        recorded = s3.client().head_object(Bucket=bucket, Key=key)["Metadata"]
        s3.client().put_object(Bucket=bucket, Key=key, Body=b"tampered", Metadata=recorded)
    # A replica that has not read the adapter yet (its local copies gone).
    shutil.rmtree(stack.data_dir / "scratch" / "artifact-cache" / "adapters" / adapter, ignore_errors=True)
    download = client.get(f"/adapters/{adapter}", headers=alice)
    assert download.status_code == 500 and "does not match its recorded sha256" in download.json()["detail"]
    reply = client.post("/generate", headers=alice, json={"adapter_id": adapter, "prompt": "Red", "max_new_tokens": 3})
    assert reply.status_code == 500 and "sha256" in reply.text


def test_a_job_waits_out_a_store_outage_and_fails_clearly_when_it_lasts(s3, stack, client, alice):
    dataset = client.post("/datasets", headers=alice, files={"file": ("outage.jsonl", chat_lines(16))}).json()
    body = {"base_model": "tiny-llama", "training_dataset_id": dataset["id"],
            "method": {"variant": "sbora_fa", "r": 4, "alpha": 8},
            "hyperparameters": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.01, "max_seq_len": 128}}
    relay = Relay(s3.port)  # the workers reach the store through it; the API directly
    relay.down()
    stack.stop_workers()

    def job(job_id: str) -> dict:
        return client.get(f"/jobs/{job_id}", headers=alice).json()

    # An outage longer than the job may wait: it fails, saying why.
    stack.start_worker(env={"SBORA_S3_ENDPOINT_URL": relay.endpoint, "SBORA_STORAGE_RETRY_S": "0"})
    impatient = client.post("/jobs", headers=alice, json=body).json()
    failed = wait_for(lambda: (j := job(impatient["id"]))["status"] == "failed" and j, 120, 0.3, "the job to fail")
    assert failed["error"]["code"] == "storage_unavailable", failed["error"]
    assert "unreachable" in failed["error"]["message"] and "create the job again" in failed["error"]["message"]
    stack.stop_workers()

    # A shorter one: the job goes back to the queue, and runs when the store returns.
    stack.start_worker(env={"SBORA_S3_ENDPOINT_URL": relay.endpoint})
    patient = client.post("/jobs", headers=alice, json=body).json()
    wait_for(lambda: any("waiting for the artifact store" in e["message"] for e in client.get(
        f"/jobs/{patient['id']}/events", headers=alice, params={"kind": "status"}).json()["data"]),
             120, 0.3, "the job to wait for the store")
    assert job(patient["id"])["status"] == "queued"
    relay.up()
    done = wait_for(lambda: (j := job(patient["id"]))["status"] in ("succeeded", "failed") and j, 180, 0.3,
                    "the job to finish once the store is back")
    assert done["status"] == "succeeded" and done["attempts"] >= 2, done
    relay.down()
    stack.stop_workers()
    stack.start_worker()
