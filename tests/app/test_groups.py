"""Adapter groups on both stacks: disjoint index sets handed out atomically, slots freed and reused,
members composing exactly (also weighted, and as a registered adapter of their own)."""

from __future__ import annotations

import io
import threading
import zipfile

import httpx
import pytest
from stack import wait_for

from sbora_core.method.adapter_io import load_adapter

TINY = "tiny-llama"


def make_group(client, headers, name, **fields):
    response = client.post("/groups", headers=headers, json={"name": name, "base_model": TINY, "variant": "sbora_fa",
                                                              "r": 4, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def job_in(group_id, dataset_id, **fields):
    return {"base_model": TINY, "training_dataset_id": dataset_id, "group": group_id,
            "hyperparameters": {"max_steps": 3, "batch_size": 4, "max_seq_len": 96, "learning_rate": 0.01}, **fields}


def test_a_group_reports_its_capacity_per_layer(client, alice):
    group = make_group(client, alice, "capacity")
    # FA selects columns: q/k/v/o/gate/up take 64 inputs, down_proj 128; at r=4, 64 // 4 = 16 members.
    assert group["capacity"] == 16 and group["used"] == 0 and group["free"] == 16
    detail = client.get(f"/groups/{group['id']}", headers=alice).json()
    down = [layer for layer in detail["layers"] if layer["name"].endswith("down_proj")]
    assert down and down[0]["dimension"] == 128 and down[0]["capacity"] == 32
    assert len(detail["layers"]) == 7 * 2 and detail["members"] == []
    assert group["id"] in [g["id"] for g in client.get("/groups", headers=alice).json()["data"]]


def test_concurrent_job_creations_never_share_a_slot(live, alice, dataset):
    group = make_group(httpx.Client(base_url=live.url), alice, "concurrent")
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def create() -> None:
        response = httpx.post(f"{live.url}/jobs", headers=alice, json=job_in(group["id"], dataset["id"]), timeout=60)
        with lock:
            answers.append(response)

    from app.core.config import get_settings

    settings = get_settings()  # the server runs in this process: lift the per-tenant job quota for the burst
    saved, settings.max_concurrent_jobs = settings.max_concurrent_jobs, 100
    try:
        threads = [threading.Thread(target=create) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        settings.max_concurrent_jobs = saved
    assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers if a.status_code != 201]
    slots = [a.json()["method"]["index_slot"] for a in answers]
    assert sorted(slots) == list(range(8))
    assert all(a.json()["method"]["index_seed"] == answers[0].json()["method"]["index_seed"] for a in answers)
    for answer in answers:  # leave the worker free for the next tests
        httpx.post(f"{live.url}/jobs/{answer.json()['id']}/cancel", headers=alice)


def test_members_compose_exactly_and_slots_come_back(client, alice, dataset, stack):
    group = make_group(client, alice, "compose")
    jobs = [client.post("/jobs", headers=alice, json=job_in(group["id"], dataset["id"], name=f"m{i}")).json()
            for i in range(2)]
    done = [wait_for(lambda j=j: (r := client.get(f"/jobs/{j['id']}", headers=alice).json())["status"]
                     in ("succeeded", "failed") and r, 180, 0.3, "a member's training") for j in jobs]
    assert [d["status"] for d in done] == ["succeeded"] * 2, [d["error"] for d in done]
    first, second = (d["adapter_id"] for d in done)

    adapters = []
    for adapter_id in (first, second):
        archive = client.get(f"/adapters/{adapter_id}", headers=alice).content
        folder = stack.data_dir.parent / f"dl-{adapter_id}"
        zipfile.ZipFile(io.BytesIO(archive)).extractall(folder)
        adapters.append(load_adapter(folder))
    for name, delta in adapters[0].modules.items():  # disjoint in every layer
        assert not set(delta.indices.tolist()) & set(adapters[1].modules[name].indices.tolist())

    body = {"prompt": "Item 3: which colour?", "max_new_tokens": 6}
    together = client.post("/generate", headers=alice, json={**body, "adapter_id": [first, second]})
    assert together.status_code == 200, together.text
    weighted = client.post("/generate", headers=alice,
                           json={**body, "adapter_id": [first, second], "adapter_weights": [1.0, 1.0]})
    assert weighted.json()["text"] == together.json()["text"]
    bad = client.post("/generate", headers=alice, json={**body, "adapter_id": [first, second],
                                                        "adapter_weights": [1.0]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "adapter_weights"

    # The registered sum generates what the two together generate.
    composed = client.post("/adapters/compose", headers=alice, json={"adapter_ids": [first, second], "name": "both"})
    assert composed.status_code == 201, composed.text
    composed = composed.json()
    assert composed["r"] == 8 and [p["adapter_id"] for p in composed["metrics"]["composed_of"]] == [first, second]
    alone = client.post("/generate", headers=alice, json={**body, "adapter_id": composed["id"]})
    assert alone.json()["text"] == together.json()["text"]
    assert client.get(f"/adapters/{composed['id']}", headers=alice, params={"format": "peft"}).status_code == 200

    # Deleting a member's adapter frees its slot: the next job takes it again.
    detail = client.get(f"/groups/{group['id']}", headers=alice).json()
    freed = next(m["slot"] for m in detail["members"] if m["adapter_id"] == first)
    assert client.delete(f"/adapters/{first}", headers=alice).status_code == 204
    again = client.post("/jobs", headers=alice, json=job_in(group["id"], dataset["id"])).json()
    assert again["method"]["index_slot"] == freed
    client.post(f"/jobs/{again['id']}/cancel", headers=alice)
    assert client.get(f"/groups/{group['id']}", headers=alice).json()["used"] == 1
    assert client.delete(f"/groups/{group['id']}", headers=alice).status_code == 409  # not empty


def test_adapters_that_overlap_are_refused_naming_both_and_the_layer(client, alice, dataset):
    plain = {"base_model": TINY, "training_dataset_id": dataset["id"], "method": {"r": 4, "alpha": 8, "index_seed": 9},
             "hyperparameters": {"max_steps": 2, "batch_size": 4, "max_seq_len": 96}}
    ids = []
    for _ in range(2):  # same seed, same slot: the same index sets
        job = client.post("/jobs", headers=alice, json=plain).json()
        ids.append(wait_for(lambda j=job: client.get(f"/jobs/{j['id']}", headers=alice).json()["adapter_id"],
                            180, 0.3, "training"))
    refused = client.post("/generate", headers=alice, json={"prompt": "x", "adapter_id": ids})
    assert refused.status_code == 422
    message = refused.json()["detail"][0]["msg"]
    assert ids[0] in message and ids[1] in message and "model.layers.0." in message
    composed = client.post("/adapters/compose", headers=alice, json={"adapter_ids": ids})
    assert composed.status_code == 422 and ids[0] in composed.json()["detail"][0]["msg"]


def test_bad_group_requests_answer_4xx_naming_the_field(client, alice, bob, dataset):
    lora = client.post("/groups", headers=alice, json={"name": "l", "base_model": TINY, "variant": "lora", "r": 4})
    assert lora.status_code == 422 and "cross" in lora.json()["detail"][0]["msg"]
    group = make_group(client, alice, "strict", r=32)  # 64 // 32: room for two
    assert group["capacity"] == 2
    mismatch = client.post("/jobs", headers=alice, json=job_in(group["id"], dataset["id"],
                                                                method={"variant": "sbora_fb"}))
    assert mismatch.status_code == 422 and mismatch.json()["detail"][0]["loc"][-1] == "variant"
    wrong_base = client.post("/jobs", headers=alice, json={**job_in(group["id"], dataset["id"]),
                                                           "base_model": "smollm2-135m-instruct"})
    assert wrong_base.status_code == 422
    foreign = client.post("/jobs", headers=bob, json=job_in(group["id"], "ds_" + "0" * 24))
    assert foreign.status_code in (404, 422)
    assert client.get(f"/groups/{group['id']}", headers=bob).status_code == 404
    made = [client.post("/jobs", headers=alice, json=job_in(group["id"], dataset["id"])) for _ in range(3)]
    assert [m.status_code for m in made] == [201, 201, 409]
    assert "capacity is 2" in made[2].json()["detail"]
    for m in made[:2]:
        client.post(f"/jobs/{m.json()['id']}/cancel", headers=alice)


def test_a_failed_creation_leaves_no_slot_reserved(client, alice, dataset, stack, monkeypatch):
    from app.core.config import get_settings
    from app.core.db import get_sessionmaker
    from app.models import GroupSlot, Job, Tenant
    from app.schemas import JobCreate
    from app.services import jobs

    group = make_group(client, alice, "atomic")

    def broken(*_args, **_kwargs):
        raise RuntimeError("the disk went away between the slot and the job's first event")

    monkeypatch.setattr(jobs, "add_event", broken)
    with get_sessionmaker()() as session:
        tenant = session.get(Tenant, group["owner"])
        jobs_before = session.query(Job).count()
        with pytest.raises(RuntimeError):
            jobs.create_job(session, tenant, JobCreate(**job_in(group["id"], dataset["id"])), get_settings())
        session.rollback()
        assert session.query(GroupSlot).filter_by(group_id=group["id"]).count() == 0
        assert session.query(Job).count() == jobs_before
    monkeypatch.undo()
    assert client.get(f"/groups/{group['id']}", headers=alice).json()["used"] == 0


def test_weights_must_be_finite(client, alice):
    for text in (b"NaN", b"Infinity"):
        response = client.post("/generate", headers={**alice, "Content-Type": "application/json"},
                               content=b'{"prompt": "x", "adapter_weights": [' + text + b"]}")
        assert response.status_code == 422, response.text


def test_openai_fine_tuning_takes_the_group_through_method_sbora(client, alice, dataset):
    group = make_group(client, alice, "via-openai")
    body = {"model": TINY, "training_file": dataset["id"],
            "method": {"type": "sbora", "sbora": {"variant": "sbora_fa", "r": 4, "group": group["id"],
                                                   "hyperparameters": {"max_steps": 2, "batch_size": 4}}}}
    response = client.post("/v1/fine_tuning/jobs", headers=alice, json=body)
    assert response.status_code == 200, response.text
    detail = client.get(f"/groups/{group['id']}", headers=alice).json()
    assert [m["job_id"] for m in detail["members"]] == [response.json()["id"]] and detail["members"][0]["slot"] == 0
    client.post(f"/v1/fine_tuning/jobs/{response.json()['id']}/cancel", headers=alice)
    body["method"]["sbora"]["group"] = "grp_" + "0" * 24
    unknown = client.post("/v1/fine_tuning/jobs", headers=alice, json=body)
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "method.sbora.group", unknown.text
