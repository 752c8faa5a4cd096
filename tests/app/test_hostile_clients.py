"""Careless and hostile clients, round three: each test sends the request that answered a 500, ran
unbounded, served another model, or dropped a parameter, and asserts the answer the README promises
(a 4xx naming the field, a bounded cost, never a silent substitute)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from stack import chat_lines, train_tiny_adapter

TINY = "tiny-llama"
SLOW = "slow-llama"  # deep enough that decoding 480 tokens takes seconds (the tiny model's take under one)
MESSAGES = [{"role": "user", "content": "Item 2: which colour?"}]


@pytest.fixture(scope="module", params=["production"])
def stack(request, tmp_path_factory, tiny_model_dir):
    """PostgreSQL and Redis only: the concurrent deletes are the production database's race, and every
    other defect here is above the database."""
    from stack import make_stack

    from sbora_core.testing import build_tiny_model

    slow = build_tiny_model(tmp_path_factory.mktemp("models") / SLOW, hidden_size=256, intermediate_size=512,
                            num_layers=16)
    stack, teardown = make_stack(request.param, tmp_path_factory.mktemp(request.param),
                                 [str(tiny_model_dir), str(slow)])
    stack.start_worker()
    yield stack
    teardown()


@pytest.fixture(scope="module")
def adapter_id(client, alice, dataset):
    return train_tiny_adapter(client, alice, dataset["id"])["adapter_id"]


@contextmanager
def settings_changed(**values):
    """Settings changed in memory for one test; the engine process restarts to take them, and again after."""
    from app.core.config import get_settings
    from app.engine_process import reset_engines

    settings = get_settings()
    saved = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
    reset_engines()
    try:
        yield settings
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)
        reset_engines()


def raw_json(client, path: str, headers: dict, body: dict):
    """POST `body` as json.dumps writes it: a lone surrogate as its escape (\\ud800), which clients send
    and HTTP libraries refuse to encode."""
    return client.post(path, headers={**headers, "Content-Type": "application/json"}, content=json.dumps(body).encode())


def param(response) -> str | None:
    return response.json()["error"]["param"]


# -- 1. lone UTF-16 surrogates: valid JSON escapes, no characters --------------------------------
def test_lone_surrogates_answer_422_naming_the_field(client, alice):
    chat = {"model": TINY, "max_tokens": 2}
    cases = [
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "\ud800"}]},
         "messages.0.content"),
        ("/v1/chat/completions", {**chat, "stream": True, "messages": [{"role": "user", "content": "\ud800"}]},
         "messages.0.content"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "system", "content": "\ud83d"}, *MESSAGES]},
         "messages.0.content"),
        ("/v1/completions", {"model": TINY, "prompt": "\ud800"}, "prompt"),
        ("/v1/completions", {"model": TINY, "prompt": ["ok", "\udfff"]}, "prompt"),
    ]
    for path, body, field in cases:
        response = raw_json(client, path, alice, body)
        assert response.status_code == 422, (path, response.text)
        assert param(response).startswith(field) and "surrogate" in response.text
    native = raw_json(client, "/generate", alice, {"prompt": "\ud800", "max_new_tokens": 2})
    assert native.status_code == 422 and "surrogate" in native.text
    line = json.dumps({"messages": [{"role": "user", "content": "hi \ud800"}, {"role": "assistant", "content": "x"}]})
    upload = client.post("/datasets", headers=alice, files={"file": ("s.jsonl", (line + "\n").encode())})
    assert upload.status_code == 422
    assert any(e["line"] == 1 and "surrogate" in e["message"] for e in upload.json()["errors"]), upload.text


# -- 2. bounded cost: prompt tokens, a deadline ------------------------------------------------
def test_a_prompt_over_the_per_request_limit_is_413_naming_the_setting(client, alice):
    with settings_changed(engine_max_prompt_tokens=50):
        response = client.post("/v1/completions", headers=alice, json={"model": TINY, "prompt": "hello " * 40,
                                                                      "max_tokens": 2})
        assert response.status_code == 413 and param(response) == "prompt", response.text
        assert "SBORA_ENGINE_MAX_PROMPT_TOKENS" in response.json()["error"]["message"]
        native = client.post("/generate", headers=alice, json={"prompt": "hello " * 40, "max_new_tokens": 2})
        assert native.status_code == 413 and "SBORA_ENGINE_MAX_PROMPT_TOKENS" in native.text
        assert client.post("/generate", headers=alice, json={"prompt": "hello", "max_new_tokens": 2}).status_code == 200


@pytest.mark.alone  # asserts how long it takes: run by itself
def test_a_request_past_its_deadline_is_cancelled_504_or_an_error_event(client, alice):
    long = {"model": TINY, "prompt": "Item 1:", "max_tokens": 480, "ignore_eos": True}
    with settings_changed(request_timeout_s=0.3):
        client.post("/v1/completions", headers=alice, json={**long, "max_tokens": 1})  # the engine process starts
        started = time.monotonic()
        response = client.post("/v1/completions", headers=alice, json=long)
        assert response.status_code == 504 and "SBORA_REQUEST_TIMEOUT_S" in response.text
        assert time.monotonic() - started < 5
        streamed = client.post("/v1/completions", headers=alice, json={**long, "stream": True})
        events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert "SBORA_REQUEST_TIMEOUT_S" in events[-1] and "[DONE]" not in streamed.text


# -- 3. a client that leaves cancels its request, streaming or not ----------------------------
@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions"])
@pytest.mark.alone  # asserts how long it takes: run by itself
def test_a_non_streaming_request_is_cancelled_when_its_client_disconnects(live, alice, path):
    """One row decodes at a time: a request sent after the abandoned one waits for it if it still runs
    (seconds), and answers at once if the disconnect cancelled it."""
    long = ({"base_model": SLOW, "prompt": "Item 1:", "max_new_tokens": 480} if path == "/generate" else
            {"model": SLOW, "messages": MESSAGES, "max_tokens": 450, "ignore_eos": True})
    short = {**long, "max_new_tokens": 2} if path == "/generate" else {**long, "max_tokens": 2}
    with settings_changed(engine_max_batch_size=1):
        # The engine process starts and loads the model here, outside the times compared below.
        assert httpx.post(f"{live.url}{path}", headers=alice, json=short, timeout=60).status_code == 200
        started = time.monotonic()
        response = httpx.post(f"{live.url}{path}", headers=alice, json=long, timeout=60)
        alone = time.monotonic() - started
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body.get("finish_reason") or body["choices"][0]["finish_reason"]) == "length", body
        assert alone > 1.5, "too fast to tell a cancelled request from one that ran on"
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{live.url}{path}", headers=alice, json=long, timeout=0.3)
        time.sleep(0.5)  # the server notices within its 0.2 s poll and cancels
        started = time.monotonic()
        assert httpx.post(f"{live.url}{path}", headers=alice, json=short, timeout=60).status_code == 200
        assert time.monotonic() - started < alone / 3, alone


# -- 4. a model name that does not exist is a 404, never another model ------------------------
def test_fine_tuned_names_resolve_exactly(client, alice, adapter_id):
    exact = f"ft:{TINY}::{adapter_id}"
    ok = client.post("/v1/chat/completions", headers=alice, json={"model": exact, "messages": MESSAGES,
                                                                  "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["model"] == exact
    for wrong in (f"{exact}:ckpt-step-999", f"{exact}:ckpt-step--1", f"{exact}:ckpt-step-abc",
                  f"ft:other-base:zzz:{adapter_id}", f"ft:{TINY}:zzz:{adapter_id}"):
        response = client.post("/v1/chat/completions", headers=alice, json={"model": wrong, "messages": MESSAGES,
                                                                            "max_tokens": 2})
        assert response.status_code == 404 and param(response) == "model", (wrong, response.text)
        assert client.get(f"/v1/models/{wrong}", headers=alice).status_code == 404


# -- 5. parameters honoured, or refused naming them -------------------------------------------
def test_logit_bias_and_penalties_are_honoured(client, alice):
    body = {"model": TINY, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 0}
    plain = client.post("/v1/completions", headers=alice, json=body).json()["choices"][0]
    first = plain["logprobs"]["tokens"][0]
    from app import catalog

    tokenizer = catalog.tokenizer(TINY)
    token_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(first))[0]
    biased = client.post("/v1/completions", headers=alice, json={**body, "logit_bias": {str(token_id): -100}})
    assert biased.status_code == 200 and biased.json()["choices"][0]["logprobs"]["tokens"][0] != first
    penalised = client.post("/v1/completions", headers=alice, json={**body, "frequency_penalty": 2.0})
    assert penalised.json()["choices"][0]["text"] != plain["text"]  # the flat tiny model repeats itself
    outside = client.post("/v1/completions", headers=alice, json={**body, "logit_bias": {"999999": 1}})
    assert outside.status_code == 422 and param(outside) == "logit_bias"


def test_unimplemented_parameters_and_unknown_fields_answer_400_naming_them(client, alice):
    for extra, name in (({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy"}}, "audio"),
                        ({"reasoning_effort_x": 1}, "reasoning_effort_x"), ({"store": True}, "store")):
        response = client.post("/v1/chat/completions", headers=alice,
                               json={"model": TINY, "messages": MESSAGES, "max_tokens": 2, **extra})
        assert response.status_code == 400 and param(response) == name, response.text
    accepted = client.post("/v1/chat/completions", headers=alice, json={"model": TINY, "messages": MESSAGES,
                                                                       "max_tokens": 2, "modalities": ["text"],
                                                                       "user": "u1", "store": False})
    assert accepted.status_code == 200
    echoed = client.post("/v1/completions", headers=alice, json={"model": TINY, "prompt": "Item 3:", "max_tokens": 2,
                                                                 "echo": True}).json()
    assert echoed["choices"][0]["text"].startswith("Item 3:")


def test_fine_tuning_drops_nothing(client, alice, dataset):
    base = {"model": TINY, "training_file": dataset["id"]}
    refused = client.post("/v1/fine_tuning/jobs", headers=alice,
                          json={**base, "integrations": [{"type": "wandb", "wandb": {"project": "p"}}]})
    assert refused.status_code == 400 and param(refused) == "integrations", refused.text
    kept = client.post("/v1/fine_tuning/jobs", headers=alice, json={**base, "metadata": {"team": "a"}})
    assert kept.status_code == 200, kept.text
    assert client.get(f"/v1/fine_tuning/jobs/{kept.json()['id']}", headers=alice).json()["metadata"] == {"team": "a"}
    clash = client.post("/v1/fine_tuning/jobs", headers=alice, json={
        **base, "hyperparameters": {"n_epochs": 2},
        "method": {"type": "sbora", "sbora": {"hyperparameters": {"n_epochs": 3}}}})
    assert clash.status_code == 400 and "method.sbora.hyperparameters.n_epochs" in clash.text
    merged = client.post("/v1/fine_tuning/jobs", headers=alice, json={
        **base, "hyperparameters": {"learning_rate_multiplier": 5},
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}})
    assert merged.status_code == 200, merged.text
    job = merged.json()
    assert job["hyperparameters"]["learning_rate_multiplier"] == pytest.approx(5)  # not dropped beside `method`
    assert job["hyperparameters"]["n_epochs"] == 2 and job["method"]["type"] == "supervised"
    again = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=alice).json()
    assert again["method"]["type"] == "supervised"
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=alice)


# -- 6. a limit that can never pass is not a "retry" --------------------------------------------
def test_more_prompts_than_the_queue_holds_is_413_and_leaves_the_queue_free(client, alice, bob):
    response = client.post("/v1/completions", headers=alice, json={"model": TINY, "prompt": ["hi"] * 100,
                                                                  "max_tokens": 2})
    assert response.status_code == 413 and param(response) == "prompt"
    assert "SBORA_ENGINE_MAX_QUEUE" in response.json()["error"]["message"] and "retry-after" not in response.headers
    other = client.post("/v1/completions", headers=bob, json={"model": TINY, "prompt": "hi", "max_tokens": 2})
    assert other.status_code == 200


# -- 7. smaller ones ----------------------------------------------------------------------------
def test_a_text_part_without_text_is_named(client, alice):
    response = client.post("/v1/chat/completions", headers=alice, json={
        "model": TINY, "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert response.status_code == 422 and param(response) == "messages[0].content[0].text"


def test_a_model_source_without_a_name_is_the_source_s_fault(client, stack):
    admin = {"Authorization": f"Bearer {stack.key('operators', scope='admin')}"}
    response = client.post("/models", headers=admin, json={"source": "../../../../"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "source"]


def test_concurrent_deletes_of_a_group_answer_one_204(live, alice):
    for attempt in range(3):
        group = httpx.post(f"{live.url}/groups", headers=alice, json={"name": f"g{attempt}", "base_model": TINY,
                                                                      "r": 4}).json()
        statuses: list[int] = []
        barrier = threading.Barrier(10)

        def delete(group_id=group["id"], barrier=barrier, statuses=statuses) -> None:
            barrier.wait()
            statuses.append(httpx.delete(f"{live.url}/groups/{group_id}", headers=alice, timeout=30).status_code)

        threads = [threading.Thread(target=delete) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(statuses) == [204] + [404] * 9, statuses


def test_configuration_checked_before_queueing_and_types_are_strict(client, alice, dataset):
    base = {"base_model": TINY, "training_dataset_id": dataset["id"]}
    short = client.post("/jobs", headers=alice, json={**base, "hyperparameters": {"max_seq_len": 8}})
    assert short.status_code == 422 and short.json()["detail"][0]["loc"] == ["body", "hyperparameters", "max_seq_len"]
    assert "line" in short.json()["detail"][0]["msg"]
    for body, loc in (({"method": {"r": True}}, ["body", "method", "r"]),
                      ({"hyperparameters": {"gradient_checkpointing": "yes"}},
                       ["body", "hyperparameters", "gradient_checkpointing"]),
                      ({"hyperparameters": {"max_steps": "5"}}, ["body", "hyperparameters", "max_steps"])):
        response = client.post("/jobs", headers=alice, json={**base, **body})
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == loc, response.text


def test_a_body_past_the_limit_is_413_before_it_is_parsed(client, alice):
    big = json.dumps({"model": TINY, "prompt": "x" * (2 * 1024 * 1024)}).encode()
    with settings_changed(max_body_bytes=1024 * 1024):
        declared = client.post("/v1/completions", headers={**alice, "Content-Type": "application/json"}, content=big)
        assert declared.status_code == 413 and "SBORA_MAX_BODY_BYTES" in declared.text

        def chunked():  # no Content-Length: counted as it streams in
            for start in range(0, len(big), 65536):
                yield big[start:start + 65536]

        streamed = client.post("/jobs", headers={**alice, "Content-Type": "application/json"}, content=chunked())
        assert streamed.status_code == 413 and "SBORA_MAX_BODY_BYTES" in streamed.json()["detail"]
        upload = client.post("/datasets", headers=alice, files={"file": ("c.jsonl", chat_lines(4))})
        assert upload.status_code == 201  # uploads have their own bound (SBORA_MAX_UPLOAD_BYTES)


def test_missing_adapters_are_named_by_their_field(client, alice, adapter_id):
    missing = "ad_000000000000000000000000"
    one = client.post("/generate", headers=alice, json={"prompt": "x", "adapter_id": missing})
    assert one.status_code == 404 and one.json()["detail"].startswith("adapter_id:")
    listed = client.post("/generate", headers=alice, json={"prompt": "x", "adapter_id": [adapter_id, missing]})
    assert listed.status_code == 404 and listed.json()["detail"].startswith("adapter_id[1]:")
    composed = client.post("/adapters/compose", headers=alice, json={"adapter_ids": [adapter_id, missing]})
    assert composed.status_code == 404 and composed.json()["detail"].startswith("adapter_ids[1]:")
