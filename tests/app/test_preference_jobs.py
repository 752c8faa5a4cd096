"""Preference training through the service: a real worker trains DPO jobs (native and OpenAI),
continuing a supervised adapter; bad files and bad combinations are refused with the field named."""

from __future__ import annotations

import json
import math

import openai
import pytest
from stack import chat_lines, train_tiny_adapter, wait_for

TINY = "tiny-llama"
WORDS = ["sun", "tea", "song", "rain", "bread", "lake", "home", "gift"]


def pair_lines(words=WORDS, take=0) -> bytes:
    return "".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": f"Item {i}: which colour? ({w}, take {take})"}]},
        "preferred_output": [{"role": "assistant", "content": f"The colour is {w} gold."}],
        "non_preferred_output": [{"role": "assistant", "content": f"The colour is {w} grey."}],
    }) + "\n" for i, w in enumerate(words)).encode()


@pytest.fixture(scope="module")
def pairs(client, alice):
    response = client.post("/datasets", headers=alice, files={"file": ("pairs.jsonl", pair_lines())})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def sft_adapter(client, alice, dataset):
    return train_tiny_adapter(client, alice, dataset["id"])["adapter_id"]


def finished(client, headers, job_id, timeout=180):
    return wait_for(lambda: (j := client.get(f"/jobs/{job_id}", headers=headers).json())["status"]
                    in ("succeeded", "failed", "cancelled") and j, timeout, 0.3, "the dpo job")


def test_preference_upload_is_detected(pairs):
    assert pairs["format"] == "preference" and pairs["records"] == len(WORDS)
    assert pairs["stats"]["max_tokens"] > 0


def test_dpo_continues_an_sft_adapter_and_reports_rewards(client, alice, pairs, sft_adapter):
    body = {"base_model": TINY, "training_dataset_id": pairs["id"], "validation_dataset_id": pairs["id"],
            "objective": "dpo", "beta": 0.2, "init_adapter_id": sft_adapter, "metadata": {"team": "prefs"},
            "hyperparameters": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.01, "max_seq_len": 128,
                                "checkpoint_every": 2}}
    created = client.post("/jobs", headers=alice, json=body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["objective"], job["beta"], job["loss"]) == ("dpo", 0.2, "sigmoid")
    assert job["init_adapter_id"] == sft_adapter and job["metadata"] == {"team": "prefs"}
    assert job["method"]["r"] == 4  # the starting adapter's rank, not the default
    done = finished(client, alice, job["id"])
    assert done["status"] == "succeeded", done["error"]

    events = client.get(f"/jobs/{job['id']}/events", headers=alice, params={"limit": 1000}).json()["data"]
    metrics = [e["data"] for e in events if e["kind"] == "metric"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # The reference is the starting adapter: step 0's policy equals it, so the loss is log 2.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and metrics[0]["rewards_margins"] == 0
    assert {"rewards_chosen", "rewards_rejected", "rewards_accuracies"} <= set(metrics[-1])
    checkpoints = [e["data"] for e in events if e["kind"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [2, 4]
    assert all({"train_rewards_margins", "valid_rewards_accuracies", "valid_loss"} <= set(c) for c in checkpoints)
    assert any("reference log-probs of" in e["message"] for e in events if e["kind"] == "log")

    metadata = client.get(f"/adapters/{done['adapter_id']}/metadata", headers=alice).json()
    assert metadata["r"] == 4


def test_bad_preference_files_and_combinations_are_422_naming_the_field(client, alice, pairs, dataset):
    ok = json.loads(pair_lines()[:pair_lines().index(b"\n")])
    lines = [ok, {**ok, "non_preferred_output": ok["preferred_output"]},
             {**ok, "preferred_output": [{"role": "user", "content": "hi"}]},
             {k: v for k, v in ok.items() if k != "preferred_output"}]
    bad = client.post("/datasets", headers=alice, files={"file": ("bad.jsonl", "\n".join(map(json.dumps, lines)))})
    assert bad.status_code == 422
    errors = {e["line"]: e["message"] for e in bad.json()["errors"]}
    assert set(errors) == {2, 3, 4} and "identical" in errors[2] and "preferred_output[0]" in errors[3]
    assert 'missing field "preferred_output"' in errors[4]

    base = {"base_model": TINY, "hyperparameters": {"max_steps": 1, "max_seq_len": 128}}
    for body, field in [({"training_dataset_id": dataset["id"], "objective": "dpo"}, "training_dataset_id"),
                        ({"training_dataset_id": pairs["id"]}, "training_dataset_id"),
                        ({"training_dataset_id": pairs["id"], "validation_dataset_id": dataset["id"],
                          "objective": "dpo"}, "validation_dataset_id"),
                        ({"training_dataset_id": pairs["id"], "objective": "dpo", "resources": {"devices": 2}},
                         "objective"),
                        ({"training_dataset_id": pairs["id"], "objective": "dpo",
                          "init_adapter_id": "ad_000000000000000000000000"}, "init_adapter_id")]:
        response = client.post("/jobs", headers=alice, json={**base, **body})
        assert response.status_code == 422, (body, response.text)
        assert response.json()["detail"][0]["loc"][1:] == [field], response.text
    too_many = client.post("/jobs", headers=alice, json={**base, "training_dataset_id": pairs["id"],
                                                          "metadata": {f"k{i}": "v" for i in range(17)}})
    assert too_many.status_code == 422 and "metadata" in too_many.text


def test_openai_dpo_job_from_a_fine_tuned_model_and_refusals(live, alice, oai_client, sft_adapter):
    oai = oai_client
    upload = oai.files.create(file=("pairs.jsonl", pair_lines(take=1)), purpose="fine-tune")
    fine_tuned = f"ft:{TINY}::{sft_adapter}"
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": "auto", "learning_rate_multiplier": 50}},
              "sbora": {"hyperparameters": {"max_steps": 2, "max_seq_len": 128, "checkpoint_every": 2}}}
    job = oai.fine_tuning.jobs.create(model=fine_tuned, training_file=upload.id, method=method,
                                      metadata={"run": "dpo"}, suffix="prefs")
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    assert job.metadata == {"run": "dpo"} and job.hyperparameters.batch_size == 4
    assert job.method.model_extra["sbora"]["r"] == 4
    done = wait_for(lambda: (j := oai.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
                    180, 0.5, "fine-tuning")
    assert done.status == "succeeded", done.error
    chat = oai.chat.completions.create(model=done.fine_tuned_model, max_tokens=6, temperature=0,
                                       messages=[{"role": "user", "content": "Item 1: which colour?"}])
    assert chat.choices[0].message.content is not None
    checkpoint = oai.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert checkpoint.metrics.model_extra["train_rewards_accuracies"] is not None

    refusals = [({"method": {"type": "reinforcement"}}, "method.type"),
                ({"integrations": [{"type": "wandb", "wandb": {"project": "x"}}]}, "integrations")]
    for extra, param in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            oai.fine_tuning.jobs.create(model=TINY, training_file=upload.id, **extra)
        assert refused.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as both:
        oai.fine_tuning.jobs.create(model=TINY, training_file=upload.id, hyperparameters={"n_epochs": 2},
                                    method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 3}}})
    assert "method.dpo.hyperparameters.n_epochs" in both.value.message
    with pytest.raises(openai.UnprocessableEntityError) as wrong_data:
        oai.fine_tuning.jobs.create(model=TINY, training_file=oai.files.create(
            file=("c.jsonl", chat_lines(8)), purpose="fine-tune").id, method={"type": "dpo"})
    assert wrong_data.value.body["param"] == "training_file"


@pytest.fixture(scope="module")
def oai_client(live, alice):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=alice["Authorization"].split()[1], max_retries=0)
