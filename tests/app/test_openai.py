"""The OpenAI-compatible surface, driven by the official `openai` client against a live server."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from stack import LiveServer, wait_for

TINY = "tiny-llama"


@pytest.fixture(scope="module")
def live(stack):
    from app.main import create_app

    server = LiveServer(create_app())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def adapter_id(client, alice, dataset):
    body = {"base_model": TINY, "training_dataset_id": dataset["id"], "method": {"variant": "sbora_fa", "r": 4, "alpha": 8},
            "hyperparameters": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.01, "max_seq_len": 128}}
    job = client.post("/jobs", headers=alice, json=body).json()
    done = wait_for(lambda: (j := client.get(f"/jobs/{job['id']}", headers=alice).json())["status"]
                    in ("succeeded", "failed") and j, 180, 0.5, "training")
    assert done["status"] == "succeeded", done["error"]
    return done["adapter_id"]


@pytest.fixture(scope="module")
def oai(live, alice):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=alice["Authorization"].split()[1], max_retries=0)


MESSAGES = [{"role": "user", "content": "Item 2: which colour?"}]


def test_models_lists_bases_and_adapters_with_their_parent(oai, adapter_id):
    models = {m.id: m for m in oai.models.list().data}
    assert TINY in models and adapter_id in models
    assert models[adapter_id].model_extra["parent"] == TINY


def test_chat_completion_matches_generate(oai, client, alice, adapter_id):
    chat = oai.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=10, temperature=0)
    native = client.post("/generate", headers=alice, json={"messages": MESSAGES, "adapter_id": adapter_id,
                                                           "max_new_tokens": 10}).json()
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == native["text"]
    assert chat.usage.completion_tokens == native["completion_tokens"]
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_streaming_chat_and_completions(oai, adapter_id):
    whole = oai.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(oai.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=10, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    text = oai.completions.create(model=TINY, prompt="The colour is", max_tokens=6, temperature=0)
    streamed = oai.completions.create(model=TINY, prompt="The colour is", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert text.usage.prompt_tokens > 0


def test_unknown_or_foreign_models_are_not_found(oai, live, bob, adapter_id):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="ad_000000000000000000000000", messages=MESSAGES)
    foreign = openai.OpenAI(base_url=f"{live.url}/v1", api_key=bob["Authorization"].split()[1], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        foreign.chat.completions.create(model=adapter_id, messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_full_queue_answers_429_with_retry_after(live, alice):
    from app.core.config import get_settings
    from app.inference import reset_engines

    settings = get_settings()
    saved = settings.engine_max_queue, settings.engine_max_batch_size
    settings.engine_max_queue, settings.engine_max_batch_size = 1, 1
    reset_engines()
    statuses: list[tuple[int, str | None]] = []

    def call():
        r = httpx.post(f"{live.url}/generate", headers=alice, timeout=120,
                       json={"prompt": "long story", "max_new_tokens": 300, "base_model": TINY})
        statuses.append((r.status_code, r.headers.get("retry-after")))

    try:
        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        settings.engine_max_queue, settings.engine_max_batch_size = saved
        reset_engines()
    assert any(code == 200 for code, _ in statuses)
    limited = [retry for code, retry in statuses if code == 429]
    assert limited and all(retry is not None and int(retry) >= 1 for retry in limited)
