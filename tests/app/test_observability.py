"""Prometheus metrics, request ids and structured logs, against the real stack (embedded flavour)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from stack import chat_lines, embedded_stack_with_worker, free_port, train_tiny_adapter, wait_for

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
    mine = [e for e in json_lines(stack.worker_log) if e.get("job_id") == job_id]
    assert any("torch threads" in e["message"] for e in mine)
    assert any(e["message"] == "succeeded" and e["adapter_id"] == adapter_id for e in mine)
    # bitsandbytes' note about an optional kernels package is not a job's business.
    assert not [e for e in json_lines(stack.worker_log) if e.get("logger", "").startswith("bitsandbytes")]


def test_sbora_serve_logs_each_request_as_json(tmp_path, tiny_model_dir):
    """The real entry point: migrations at start-up must not replace the JSON handler (alembic.ini has its own)."""
    port = free_port()
    env = {**os.environ, "SBORA_DATA_DIR": str(tmp_path / "data"), "SBORA_MODELS": json.dumps([str(tiny_model_dir)]),
           "SBORA_LOG_FORMAT": "json"}
    for var in ("SBORA_DATABASE_URL", "SBORA_BROKER_URL"):
        env.pop(var, None)
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sbora_cli.main", "serve", "--port", str(port), "--no-worker"],
                                env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(f"{url}/healthz"), 60, 0.3, "sbora serve to start")
        httpx.get(f"{url}/healthz", headers={"X-Request-ID": "serve-check-1"})
        found = wait_for(lambda: [e for e in json_lines(log_path) if e.get("request_id") == "serve-check-1"],
                         10, 0.2, "the request's log line")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert found[0]["route"] == "/healthz" and found[0]["status"] == 200 and found[0]["logger"] == "app.request"


def answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def json_lines(path) -> list[dict]:
    """The JSON lines of a log file (banners and Celery's start-up text are plain lines)."""
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries
