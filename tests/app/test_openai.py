"""The OpenAI-compatible surface, driven by the official `openai` client against a live server."""

from __future__ import annotations

import threading
from contextlib import ExitStack

import httpx
import openai
import pytest
from stack import chat_lines, train_tiny_adapter, wait_for

TINY = "tiny-llama"


@pytest.fixture(scope="module")
def adapter_id(client, alice, dataset):
    return train_tiny_adapter(client, alice, dataset["id"])["adapter_id"]


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
    from app.engine_process import reset_engines

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


def test_generations_in_flight_hold_no_database_connection(live, alice):
    """A generation can run for seconds: holding a pooled connection meanwhile let 20 generating
    clients exhaust the pool and stall every other route for its 30 s timeout."""
    from app.core.db import get_engine

    pool = get_engine().pool
    long = {"max_tokens": 400, "ignore_eos": True, "stream": True, "model": TINY}
    with httpx.Client(base_url=live.url, headers=alice, timeout=60) as http, ExitStack() as streams:
        for path, body in [("/v1/completions", {"prompt": "Item 1:"}),
                           ("/v1/chat/completions", {"messages": MESSAGES}),
                           ("/generate", {"prompt": "Item 2:", "max_new_tokens": 400, "stream": True})]:
            response = streams.enter_context(http.stream("POST", path, json=body if path == "/generate"
                                                         else {**long, **body}))
            assert response.status_code == 200, response.read()
            next(response.iter_lines())  # the first token: past its lookups, generating
        assert pool.checkedout() == 0
        assert http.get("/jobs").status_code == 200


# -- what current SDKs and agent frameworks send ---------------------------------------------
def test_content_parts_the_developer_role_and_usage_in_streams(oai, adapter_id):
    plain = oai.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=8, temperature=0)
    parts = oai.chat.completions.create(model=adapter_id, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Item 2: "}, {"type": "text", "text": "which colour?"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    as_system = oai.chat.completions.create(model=adapter_id, max_tokens=8, temperature=0,
                                            messages=[{"role": "system", "content": "Be brief."}, *MESSAGES])
    as_developer = oai.chat.completions.create(model=adapter_id, max_tokens=8, temperature=0,
                                               messages=[{"role": "developer", "content": "Be brief."}, *MESSAGES])
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content

    chunks = list(oai.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=8, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == plain.choices[0].message.content
    streamed = list(oai.completions.create(model=TINY, prompt="The colour is", max_tokens=5, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert streamed[-1].usage.completion_tokens > 0 and streamed[-1].choices == []


def test_list_prompts_get_a_choice_each(oai):
    prompts = ["The colour is", "Item 2: which"]
    alone = [oai.completions.create(model=TINY, prompt=p, max_tokens=5, temperature=0).choices[0].text
             for p in prompts]
    together = oai.completions.create(model=TINY, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in together.choices] == [0, 1]
    assert [c.text for c in together.choices] == alone
    streamed = oai.completions.create(model=TINY, prompt=prompts, max_tokens=5, temperature=0, stream=True)
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == alone


def test_logprobs_on_completions_and_chat(oai, adapter_id):
    completion = oai.completions.create(model=TINY, prompt="The colour is", max_tokens=5, temperature=0, logprobs=2)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == completion.usage.completion_tokens == len(lp.token_logprobs)
    assert "".join(lp.tokens) == completion.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and len(top) == 2
        assert chosen == pytest.approx(max(top.values()))  # greedy: the chosen token is the likeliest

    chat = oai.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 and bytes(t.bytes).decode() == t.token for t in content)
    without = oai.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=6, temperature=0)
    assert without.choices[0].logprobs is None


def test_parameters_the_server_does_not_implement_answer_400_naming_them(oai, adapter_id):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for extra, param in (({"tools": [tool]}, "tools"), ({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"n": 2}, "n")):
        with pytest.raises(openai.BadRequestError) as refused:
            oai.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=2, **extra)
        assert refused.value.body["param"] == param, refused.value.body
    with pytest.raises(openai.BadRequestError) as image:
        oai.chat.completions.create(model=adapter_id, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}])
    assert image.value.body["param"] == "messages[0].content[1].type" and "image_url" in image.value.message
    # response_format text is what the server does anyway: accepted.
    oai.chat.completions.create(model=adapter_id, messages=MESSAGES, max_tokens=2, response_format={"type": "text"})


def test_errors_name_the_request_s_own_fields(oai, live, alice):
    with pytest.raises(openai.UnprocessableEntityError) as too_long:
        oai.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=10**6)
    assert too_long.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as unknown:
        oai.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert unknown.value.body["param"] == "model"
    broken = httpx.post(f"{live.url}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                        headers={**alice, "Content-Type": "application/json"})
    assert broken.status_code == 422 and broken.json()["error"]["param"] is None


def test_file_content_returns_the_upload(oai):
    upload = oai.files.create(file=("c.jsonl", chat_lines(8, offset=300)), purpose="fine-tune")
    assert oai.files.content(upload.id).read() == chat_lines(8, offset=300)


# -- fine-tuning: files, jobs, events, checkpoints, cancel -------------------------------------
def sbora_method(**hyperparameters) -> dict:
    return {"type": "sbora", "sbora": {"variant": "sbora_fb", "r": 4, "alpha": 8, "hyperparameters": {
        "n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 50, "max_seq_len": 128, **hyperparameters}}}


def test_fine_tuning_flow_ends_in_a_model_chat_can_use(oai, client, alice):
    upload = oai.files.create(file=("colours.jsonl", chat_lines(24)), purpose="fine-tune")
    assert upload.object == "file" and upload.purpose == "fine-tune" and upload.bytes == len(chat_lines(24))
    validation = oai.files.create(file=("held-out.jsonl", chat_lines(6, offset=400)), purpose="fine-tune")
    job = oai.fine_tuning.jobs.create(model=TINY, training_file=upload.id, validation_file=validation.id,
                                      suffix="colours", seed=3, method=sbora_method(max_steps=4, checkpoint_every=2))
    assert job.status == "queued" and job.training_file == upload.id and job.seed == 3
    assert job.hyperparameters.batch_size == 4 and job.hyperparameters.learning_rate_multiplier == pytest.approx(50)
    done = wait_for(lambda: (j := oai.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
                    180, 0.5, "fine-tuning")
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith(f"ft:{TINY}:colours:ad_") and done.trained_tokens > 0

    native = client.get(f"/jobs/{job.id}", headers=alice).json()
    assert done.fine_tuned_model.endswith(native["adapter_id"])
    assert client.get(f"/adapters/{native['adapter_id']}/metadata", headers=alice).json()["variant"] == "sbora_fb"

    events = oai.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    steps = sorted(e.data["step"] for e in events if e.type == "metrics" and "loss" in e.data)
    assert steps == [1, 2, 3, 4]
    first_page = oai.fine_tuning.jobs.list_events(job.id, limit=2)
    assert first_page.has_more and len(first_page.data) == 2
    assert oai.fine_tuning.jobs.list_events(job.id, limit=1, after=first_page.data[0].id).data[0].id == first_page.data[1].id
    assert [e.id for e in oai.fine_tuning.jobs.list_events(job.id, limit=100, after=events[-2].id).data] == [events[-1].id]
    assert oai.fine_tuning.jobs.list_events(job.id, after="ftevent-0").data == []  # names no event of this job

    checkpoints = oai.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4, 2]  # newest first
    assert all(c.fine_tuning_job_id == job.id and c.metrics.train_loss is not None for c in checkpoints)
    # OpenAI's checkpoint metrics; the last step's checkpoint has the full validation set's too.
    for c in checkpoints:
        assert 0 <= c.metrics.train_mean_token_accuracy <= 1 and 0 <= c.metrics.valid_mean_token_accuracy <= 1
        assert c.metrics.valid_loss > 0 and c.metrics.step == c.step_number
    assert checkpoints[0].metrics.full_valid_loss > 0 and 0 <= checkpoints[0].metrics.full_valid_mean_token_accuracy <= 1
    assert checkpoints[1].metrics.full_valid_loss is None
    # A checkpoint is a model: chat with it by its name, and it is not the final adapter.
    first = checkpoints[-1].fine_tuned_model_checkpoint
    assert first.startswith(f"ft:{TINY}:colours:") and first.endswith(":ckpt-step-2")
    early = oai.chat.completions.create(model=first, messages=MESSAGES, max_tokens=6, temperature=0)
    assert early.model == first and early.choices[0].message.content is not None
    assert oai.models.retrieve(first).id == first
    registered = client.get("/adapters", headers=alice, params={"checkpoints": True, "limit": 200}).json()["data"]
    steps = sorted(a["checkpoint_step"] for a in registered if a["job_id"] == job.id and a["checkpoint_step"])
    assert steps == [2, 4]
    assert all(a["checkpoint_step"] is None for a in client.get("/adapters", headers=alice).json()["data"])

    assert oai.models.retrieve(done.fine_tuned_model).model_extra["parent"] == TINY
    assert oai.models.retrieve(TINY).id == TINY
    chat = oai.chat.completions.create(model=done.fine_tuned_model, messages=MESSAGES, max_tokens=8, temperature=0)
    same = client.post("/generate", headers=alice, json={"messages": MESSAGES, "adapter_id": native["adapter_id"],
                                                         "max_new_tokens": 8}).json()
    assert chat.choices[0].message.content == same["text"]


def test_supervised_method_maps_openai_hyperparameters_and_cancels(oai):
    upload = oai.files.create(file=("colours.jsonl", chat_lines(24, offset=50)), purpose="fine-tune")
    job = oai.fine_tuning.jobs.create(model=TINY, training_file=upload.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 900, "batch_size": 2,
                                                                 "learning_rate_multiplier": 0.5}}})
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (900, 2)
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(0.5)
    assert job.method.type == "supervised" and job.method.model_extra["sbora"]["variant"] == "sbora_fa"
    assert [j.id for j in oai.fine_tuning.jobs.list(limit=1).data] == [job.id]
    oai.fine_tuning.jobs.cancel(job.id)
    ended = wait_for(lambda: (j := oai.fine_tuning.jobs.retrieve(job.id)).status in ("cancelled", "failed", "succeeded")
                     and j, 60, 0.5, "cancellation")
    assert ended.status == "cancelled" and ended.fine_tuned_model is None

    # The listing, newest first, each job with the method type it was created with; walking it one job
    # at a time through the cursor gives the same jobs in the same order.
    everything = oai.fine_tuning.jobs.list(limit=100)
    assert not everything.has_more and len(everything.data) >= 2
    assert everything.data[0].id == job.id and everything.data[0].method.type == "supervised"
    assert [j.method.type for j in everything.data] == [oai.fine_tuning.jobs.retrieve(j.id).method.type
                                                        for j in everything.data]
    walked, page = [], oai.fine_tuning.jobs.list(limit=1)
    while True:
        walked += [j.id for j in page.data]
        if not page.has_more:
            break
        page = oai.fine_tuning.jobs.list(limit=1, after=walked[-1])
    assert walked == [j.id for j in everything.data]


def test_fine_tuning_errors_name_the_openai_field(oai, live, bob):
    with pytest.raises(openai.UnprocessableEntityError) as bad_purpose:
        oai.files.create(file=("x.jsonl", chat_lines(4)), purpose="assistants")
    assert bad_purpose.value.body["param"] == "purpose"
    with pytest.raises(openai.UnprocessableEntityError) as bad_lines:
        oai.files.create(file=("x.jsonl", b'{"messages": []}\nnot json\n'), purpose="fine-tune")
    assert "line 2" in bad_lines.value.message
    with pytest.raises(openai.UnprocessableEntityError) as missing:
        oai.fine_tuning.jobs.create(model=TINY, training_file="ds_000000000000000000000000")
    assert missing.value.body["param"] == "training_file" and "/v1/files" in missing.value.message
    upload = oai.files.create(file=("c.jsonl", chat_lines(8)), purpose="fine-tune")
    with pytest.raises(openai.UnprocessableEntityError) as rank:
        oai.fine_tuning.jobs.create(model=TINY, training_file=upload.id, method={
            "type": "sbora", "sbora": {"r": 100000}})
    assert rank.value.body["param"] == "method.sbora.r"
    with pytest.raises(openai.UnprocessableEntityError) as model:
        oai.fine_tuning.jobs.create(model="no-such-model", training_file=upload.id)
    assert model.value.body["param"] == "model"

    foreign = openai.OpenAI(base_url=f"{live.url}/v1", api_key=bob["Authorization"].split()[1], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        foreign.files.retrieve(upload.id)
    with pytest.raises(openai.NotFoundError):
        foreign.models.retrieve(f"ft:{TINY}::ad_000000000000000000000000")
    with pytest.raises(openai.UnprocessableEntityError):
        foreign.fine_tuning.jobs.create(model=TINY, training_file=upload.id)
    assert upload.id not in [f.id for f in foreign.files.list().data]


def test_echo_scores_the_prompt_for_bases_and_adapters(oai, live, alice, adapter_id, tiny_model_dir):
    """lm-evaluation-harness's request: echo with logprobs returns every prompt token's log-probability
    (the first has none), for text and token-id prompts, on the base and with an adapter; max_tokens 0
    generates nothing."""
    import torch

    from app.core.db import session_scope
    from app.models import Adapter
    from app.services.adapters import adapter_files
    from app.storage import get_store
    from sbora_core.method.adapter_io import load_adapter
    from sbora_core.method.merge import merge_adapters
    from sbora_core.method.models import load_base_model

    base = load_base_model(str(tiny_model_dir), device="cpu")
    with session_scope() as session:
        adapter = load_adapter(adapter_files(session.get(Adapter, adapter_id), get_store()))

    @torch.no_grad()
    def direct(ids):
        logprobs = torch.log_softmax(base.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        return [logprobs[i - 1, t].item() for i, t in enumerate(ids) if i > 0]

    text = "The colour is red"
    ids = base.tokenizer(text)["input_ids"]
    plain = direct(ids)
    handle = merge_adapters(base.model, [adapter])
    adapted = direct(ids)
    handle.unmerge()
    for model, expected in ((TINY, plain), (adapter_id, adapted)):
        for prompt in (text, ids):
            scored = oai.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
            choice = scored.choices[0]
            assert choice.text == text and scored.usage.completion_tokens == 0
            assert choice.logprobs.tokens and "".join(choice.logprobs.tokens) == text
            assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
            assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    # As lm-eval sends it: a batch of token-id prompts, one token generated after each.
    batch = oai.completions.create(model=adapter_id, prompt=[ids, ids[:3]], max_tokens=1, echo=True, logprobs=1,
                                   temperature=0)
    for choice, n in zip(sorted(batch.choices, key=lambda c: c.index), (len(ids), 3), strict=True):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == n + 1, "each prompt token, then the one token drawn"
        assert lp.token_logprobs[1:n] == pytest.approx(adapted[: n - 1], abs=1e-4)
        assert all(len(top) == 1 and max(top.values()) >= chosen - 1e-5
                   for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True))
    with pytest.raises(openai.UnprocessableEntityError) as nothing:
        oai.completions.create(model=TINY, prompt=text, max_tokens=0)
    assert nothing.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as streamed:
        oai.completions.create(model=TINY, prompt=text, max_tokens=1, echo=True, stream=True)
    assert streamed.value.body["param"] == "echo"
    with pytest.raises(openai.UnprocessableEntityError) as foreign:
        oai.completions.create(model=TINY, prompt=[10**6], max_tokens=0, echo=True)
    assert foreign.value.body["param"] == "prompt"
