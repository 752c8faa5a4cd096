"""Prometheus metrics, request ids and structured logs, against the real stack (embedded flavour)."""

from __future__ import annotations

import io
import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families
from stack import chat_lines, embedded_stack_with_worker, train_tiny_adapter

TINY = "tiny-llama"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    with embedded_stack_with_worker(tmp_path_factory.mktemp("observed"), tiny_model_dir) as stack:
        yield stack


def scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics as {(name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def train_adapter(client, alice) -> tuple[str, str]:
    dataset = client.post("/datasets", headers=alice, files={"file": ("c.jsonl", chat_lines(16))}).json()
    done = train_tiny_adapter(client, alice, dataset["id"])
    return done["id"], done["adapter_id"]


def test_metrics_count_requests_jobs_generations_and_the_adapter_cache(stack, client, alice):
    before = scrape(client)
    job_id, adapter_id = train_adapter(client, alice)
    tokens = 0
    for _ in range(2):  # the second generation finds the adapter cached
        out = client.post("/generate", headers=alice, json={"prompt": "The colour is", "adapter_id": adapter_id,
                                                            "max_new_tokens": 5})
        assert out.status_code == 200, out.text
        tokens += out.json()["completion_tokens"]
    client.get("/jobs/job_000000000000000000000000", headers=alice)  # a 404, counted by route template
    after = scrape(client)

    assert value(after, "sbora_jobs", state="succeeded") == value(before, "sbora_jobs", state="succeeded") + 1
    assert value(after, "sbora_generation_duration_seconds_count") - value(before, "sbora_generation_duration_seconds_count") == 2
    assert value(after, "sbora_generated_tokens_total") - value(before, "sbora_generated_tokens_total") == tokens
    assert value(after, "sbora_adapter_cache_misses_total") >= 1 and value(after, "sbora_adapter_cache_hits_total") >= 1
    assert value(after, "sbora_http_requests_total", route="/jobs/{job_id}", method="GET", status="404") >= 1
    assert value(after, "sbora_http_requests_total", route="/generate", method="POST", status="200") >= 2
    assert value(after, "sbora_http_request_duration_seconds_count", route="/jobs/{job_id}") > \
        value(before, "sbora_http_request_duration_seconds_count", route="/jobs/{job_id}")
    # No per-id label: the route label stays a template whatever ids clients send.
    assert not any(job_id in str(labels) for _, labels in after)

    # Queue depth: with no worker running, a new job waits.
    stack.stop_workers()
    dataset_id = client.get("/datasets", headers=alice).json()["data"][0]["id"]
    waiting = client.post("/jobs", headers=alice, json={"base_model": TINY, "training_dataset_id": dataset_id,
                                                         "hyperparameters": {"max_steps": 1}}).json()
    assert value(scrape(client), "sbora_queue_depth") == 1
    client.post(f"/jobs/{waiting['id']}/cancel", headers=alice)
    assert value(scrape(client), "sbora_queue_depth") == 0
    stack.start_worker()


def test_request_ids_and_json_request_logs(client, alice):
    from app.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("app.request")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        given = client.get("/jobs", headers={**alice, "X-Request-ID": "trace-123"})
        fresh = client.get("/jobs/job_000000000000000000000000", headers=alice)
        hostile = client.get("/jobs", headers={**alice, "X-Request-ID": "bad id\twith spaces"})
    finally:
        logger.removeHandler(handler)
    assert given.headers["x-request-id"] == "trace-123"
    assert len(fresh.headers["x-request-id"]) == 16
    assert hostile.headers["x-request-id"] != "bad id\twith spaces"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["request_id"], e["route"], e["status"]) for e in lines] == [
        ("trace-123", "/jobs", 200), (fresh.headers["x-request-id"], "/jobs/{job_id}", 404),
        (hostile.headers["x-request-id"], "/jobs", 200)]
    assert all(e["level"] == "info" and e["duration_ms"] >= 0 for e in lines)


def test_worker_writes_json_lines_tagged_with_the_job_id(stack, client, alice):
    job_id, adapter_id = train_adapter(client, alice)
    entries = []
    for line in stack.worker_log.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # Celery's start-up banner is plain text
    mine = [e for e in entries if e.get("job_id") == job_id]
    assert any("torch threads" in e["message"] for e in mine)
    assert any(e["message"] == "succeeded" and e["adapter_id"] == adapter_id for e in mine)
