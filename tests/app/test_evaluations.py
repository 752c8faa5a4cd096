"""Evaluations as a service, on the production stack (PostgreSQL, Redis, real worker processes): an
adapter trained on a task scores above the base on held-out items (queued by the job's eval_after),
the service's result equals the library's on the same items, a killed worker's evaluation resumes
to the result of an uninterrupted one without scoring an item twice, and bad requests answer 4xx
naming the field."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from stack import make_stack, wait_for

TINY = "tiny-llama"
FAST_FAILOVER = {"SBORA_RECONCILE_INTERVAL_S": "1", "SBORA_WORKER_HEARTBEAT_S": "1", "SBORA_QUEUED_STALE_S": "3",
                 "SBORA_ENGINE_WARM_START": "0"}
COLOURS = ["pink", "blue", "gold", "teal"]  # one length: the sum of log-probabilities compares them fairly


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    stack, teardown = make_stack("production", tmp_path_factory.mktemp("evaluations"), [str(tiny_model_dir)],
                                 extra_env=FAST_FAILOVER)
    stack.start_worker()
    yield stack
    teardown()


@pytest.fixture(scope="module")
def client(stack):
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def alice(stack):
    return {"Authorization": f"Bearer {stack.key('alice')}"}


@pytest.fixture(scope="module")
def bob(stack):
    return {"Authorization": f"Bearer {stack.key('bob')}"}


def upload(client, headers, name: str, records: list[dict]) -> str:
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    response = client.post("/datasets", headers=headers, files={"file": (name, body)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def held_out_items(start: int, n: int) -> list[dict]:
    """The task: every item's right answer is pink, the colour the untrained tiny model likes least (these
    item numbers are not in the training set)."""
    return [{"question": f"Which colour is item {i}?", "choices": COLOURS, "answer": "pink"} for i in range(start, start + n)]


@pytest.fixture(scope="module")
def mc_set(client, alice):
    return upload(client, alice, "held-out.jsonl", held_out_items(500, 40))


@pytest.fixture(scope="module")
def em_set(client, alice):
    return upload(client, alice, "sums.jsonl", [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}
                                                for i in range(24)])


def wait_done(client, headers, evaluation_id, timeout=300):
    return wait_for(lambda: (e := client.get(f"/evaluations/{evaluation_id}", headers=headers).json())["status"]
                    in ("succeeded", "failed", "cancelled") and e, timeout, 0.2, f"evaluation {evaluation_id}")


def train(client, headers, dataset_id, steps, eval_after=None, **method):
    body = {"base_model": TINY, "training_dataset_id": dataset_id,
            "method": {"variant": "sbora_fa", "r": 8, "alpha": 16, **method},
            "hyperparameters": {"max_steps": steps, "batch_size": 8, "learning_rate": 0.02, "max_seq_len": 64,
                                "warmup_ratio": 0.0},
            "eval_after": eval_after}
    job = client.post("/jobs", headers=headers, json=body)
    assert job.status_code == 201, job.text
    done = wait_for(lambda: (j := client.get(f"/jobs/{job.json()['id']}", headers=headers).json())["status"]
                    in ("succeeded", "failed") and j, 300, 0.3, "training")
    assert done["status"] == "succeeded", done["error"]
    return done


@pytest.fixture(scope="module")
def task_job(client, alice, mc_set):
    records = [{"prompt": f"Question: Which colour is item {i}?\nAnswer:", "completion": " pink"} for i in range(48)]
    train_set = upload(client, alice, "task.jsonl", records)
    return train(client, alice, train_set, 40, eval_after={"dataset_id": mc_set, "grader": "multiple_choice"})


@pytest.fixture(scope="module")
def after(client, alice, task_job):
    """The evaluation the task job queued when it succeeded (eval_after)."""
    events = client.get(f"/jobs/{task_job['id']}/events", headers=alice, params={"limit": 1000}).json()["data"]
    queued = [e["data"]["evaluation_id"] for e in events if "evaluation_id" in e["data"]]
    assert len(queued) == 1, [e["message"] for e in events]
    done = wait_done(client, alice, queued[0])
    assert done["status"] == "succeeded", done["error"]
    return done


def test_a_trained_adapter_beats_the_base_on_held_out_items(after, task_job):
    assert after["source_job_id"] == task_job["id"]
    base, adapter = after["result"]["candidates"]
    assert (base["label"], adapter["label"]) == ("base", task_job["adapter_id"])
    assert adapter["metrics"]["accuracy"]["value"] > base["metrics"]["accuracy"]["value"]
    (pair,) = after["result"]["paired"]
    assert pair["candidate"] == task_job["adapter_id"] and pair["versus"] == "base"
    assert pair["metrics"]["accuracy"]["ci95"][0] > 0, "the paired interval of the gain lies above 0"
    assert adapter["correct"] + adapter["wrong"] == 40 and adapter["tokens"] > 0


def test_the_service_scores_exactly_as_the_library(tiny_model_dir, after, task_job):
    from app.core.db import session_scope
    from app.models import Adapter, Dataset
    from app.services.adapters import adapter_files
    from app.storage import get_store
    from sbora_core.method.adapter_io import load_adapter
    from sbora_core.method.models import load_base_model
    from sbora_core.training.eval_items import read_eval_items
    from sbora_core.training.harness import Candidate, EvalSpec, evaluate

    store = get_store()
    with session_scope() as session:
        adapter = load_adapter(adapter_files(session.get(Adapter, task_job["adapter_id"]), store))
        dataset = session.get(Dataset, after["dataset_id"])
        path = store.local_file(dataset.storage_key, dataset.sha256)
    spec = EvalSpec(**after["settings"])
    base = load_base_model(str(tiny_model_dir), device="cpu")
    summary, _ = evaluate(base.model, base.tokenizer, read_eval_items(path, spec.grader), spec,
                          [Candidate("base"), Candidate(task_job["adapter_id"], [adapter])], base.fingerprint)
    assert summary == after["result"]


def test_items_filter_by_candidate_and_by_right_or_wrong(client, alice, after, task_job):
    base = after["result"]["candidates"][0]
    wrong = client.get(f"/evaluations/{after['id']}/items", headers=alice,
                       params={"candidate": "base", "correct": "false", "limit": 1000}).json()
    assert wrong["total"] == base["wrong"] and all(i["correct"] is False and i["candidate"] == "base"
                                                   for i in wrong["data"])
    right = client.get(f"/evaluations/{after['id']}/items", headers=alice,
                       params={"candidate": task_job["adapter_id"], "correct": "true", "limit": 1000}).json()
    assert right["total"] == after["result"]["candidates"][1]["correct"]
    item = right["data"][0]
    assert item["output"]["choice"] == item["output"]["gold"] == 0 and item["line"] == item["item"] + 1
    assert client.get(f"/evaluations/{after['id']}/items", headers=alice,
                      params={"candidate": "nobody"}).status_code == 422
    listed = client.get("/evaluations", headers=alice).json()
    assert after["id"] in [e["id"] for e in listed["data"]]
    assert after["id"] not in [j["id"] for j in client.get("/jobs", headers=alice).json()["data"]]
    assert client.get(f"/jobs/{after['id']}", headers=alice).status_code == 404


def test_a_killed_worker_s_evaluation_resumes_to_the_uninterrupted_result(stack, client, alice, em_set, task_job):
    body = {"dataset_id": em_set, "grader": "exact_match", "max_new_tokens": 40, "chunk_size": 4, "batch_size": 4,
            "candidates": ["tiny-llama", {"model": task_job["adapter_id"], "label": "tuned"}]}
    reference = wait_done(client, alice, client.post("/evaluations", headers=alice, json=body).json()["id"])
    assert reference["status"] == "succeeded", reference["error"]

    victim = client.post("/evaluations", headers=alice, json=body).json()
    wait_for(lambda: client.get(f"/evaluations/{victim['id']}", headers=alice).json()["progress"]["done"] >= 8,
             120, 0.05, "two chunks stored")
    stack.kill_worker(stack.workers[-1])  # mid-evaluation: main process and its pool process
    stored = client.get(f"/evaluations/{victim['id']}", headers=alice).json()
    assert stored["status"] == "running" and 8 <= stored["progress"]["done"] < 48
    stack.start_worker()
    done = wait_done(client, alice, victim["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert done["result"] == reference["result"]
    events = client.get(f"/evaluations/{victim['id']}/events", headers=alice, params={"limit": 1000}).json()["data"]
    resumed = [e["message"] for e in events if "resuming after" in e["message"]]
    again = [e["data"]["scored"] for e in events if "scored" in e["data"]]
    assert len(resumed) == 1 and len(again) == 1, [e["message"] for e in events]
    kept = int(resumed[0].split("resuming after the ")[1].split()[0])
    assert kept >= 8 and kept + again[0] == 48, "the second attempt scored only what was not stored"
    items = client.get(f"/evaluations/{victim['id']}/items", headers=alice, params={"limit": 1000}).json()
    assert items["total"] == 48
    assert sorted((i["candidate"], i["item"]) for i in items["data"]) == sorted(
        (c, n) for c in ("tiny-llama", "tuned") for n in range(24))


def test_bad_requests_answer_4xx_naming_the_field(client, alice, bob, mc_set, em_set, task_job):
    other = train(client, alice, upload(client, alice, "o.jsonl", [{"prompt": f"p{i}", "completion": " c"}
                                                                   for i in range(8)]), 2)

    def refused(headers, body, code=422):
        response = client.post("/evaluations", headers=headers, json={"grader": "multiple_choice", **body})
        assert response.status_code == code, response.text
        return ".".join(str(p) for p in response.json()["detail"][0]["loc"][1:]), response.json()["detail"][0]["msg"]

    field, message = refused(alice, {"dataset_id": mc_set, "candidates": [TINY, "no-such-model"]})
    assert field == "candidates[1].model" and "'no-such-model'" in message
    bobs = upload(client, bob, "bob.jsonl", held_out_items(0, 4))
    field, message = refused(bob, {"dataset_id": bobs, "candidates": [task_job["adapter_id"]]})
    assert field == "candidates[0].model" and "neither a base model nor one of your adapters" in message
    # An `ft:` name must be the adapter's own (base and suffix), as in chat requests.
    field, message = refused(alice, {"dataset_id": mc_set, "candidates": [f"ft:{TINY}:other:{task_job['adapter_id']}"]})
    assert field == "candidates[0].model" and f"served as 'ft:{TINY}::{task_job['adapter_id']}'" in message
    field, message = refused(alice, {"dataset_id": em_set, "candidates": [TINY]})
    assert field == "dataset_id" and "line 1: no options" in message
    field, message = refused(alice, {"dataset_id": mc_set, "candidates": [f"{task_job['adapter_id']}+{other['adapter_id']}"]})
    assert field == "candidates[0].model" and "overlap" in message
    field, _ = refused(alice, {"dataset_id": mc_set, "candidates": [{"model": task_job["adapter_id"], "weights": [1, 2]}]})
    assert field == "candidates[0].weights"
    field, _ = refused(alice, {"dataset_id": bobs, "candidates": [TINY]})
    assert field == "dataset_id"
    field, _ = refused(alice, {"dataset_id": mc_set, "candidates": [TINY, TINY]})
    assert field == "candidates[1].label"
    job = client.post("/jobs", headers=alice, json={"base_model": TINY, "training_dataset_id": mc_set})
    assert job.status_code == 422 and job.json()["detail"][0]["loc"] == ["body", "training_dataset_id"]
    assert "evaluation set" in job.json()["detail"][0]["msg"]
    job = client.post("/jobs", headers=alice, json={"base_model": TINY, "training_dataset_id": other["training_dataset_id"],
                                                    "eval_after": {"dataset_id": em_set, "grader": "multiple_choice"}})
    assert job.status_code == 422 and job.json()["detail"][0]["loc"] == ["body", "eval_after", "dataset_id"]
    assert client.get("/evaluations", headers=bob).json()["total"] == 0


def test_cancel_and_delete(client, alice, em_set):
    scored = train(client, alice, upload(client, alice, "s.jsonl", [{"prompt": f"p{i}", "completion": " c"}
                                                                    for i in range(8)]), 2)["adapter_id"]
    body = {"dataset_id": em_set, "grader": "exact_match", "max_new_tokens": 40, "chunk_size": 4,
            "candidates": [TINY, f"ft:{TINY}::{scored}"]}  # an adapter by its fine-tuned model name
    evaluation = client.post("/evaluations", headers=alice, json=body).json()
    assert client.delete(f"/evaluations/{evaluation['id']}", headers=alice).status_code == 409
    # The adapter it scores stays while it is unfinished (409 naming it), and may go once it is cancelled.
    in_use = client.delete(f"/adapters/{scored}", headers=alice)
    assert in_use.status_code == 409 and evaluation["id"] in in_use.text, in_use.text
    cancelled = client.post(f"/evaluations/{evaluation['id']}/cancel", headers=alice).json()
    assert cancelled["status"] in ("cancelled", "cancelling")
    assert wait_done(client, alice, evaluation["id"])["status"] == "cancelled"
    assert client.delete(f"/evaluations/{evaluation['id']}", headers=alice).status_code == 204
    assert client.get(f"/evaluations/{evaluation['id']}", headers=alice).status_code == 404
    assert client.delete(f"/adapters/{scored}", headers=alice).status_code == 204
