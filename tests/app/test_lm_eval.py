"""lm-evaluation-harness drives the server: its `local-completions` model scores a multiple-choice
task (a task YAML over a file this test writes) through /v1/completions with echo and logprobs, and
gets the accuracy the server's own multiple_choice evaluation gets on the same items, item by item,
for the base model and for an adapter."""

from __future__ import annotations

import json
import random

import pytest
from fastapi.testclient import TestClient
from stack import LiveServer, chat_lines, make_stack, train_tiny_adapter, wait_for

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency (pip install -e '.[dev]')")

TINY = "tiny-llama"
WORDS = ["apple", "river stone", "a very long and winding answer", "blue", "seven", "the moon at night", "x", "tea"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    stack, teardown = make_stack("embedded", tmp_path_factory.mktemp("lm-eval"), [str(tiny_model_dir)],
                                 extra_env={"SBORA_ENGINE_WARM_START": "0"})
    stack.start_worker()
    yield stack
    teardown()


@pytest.fixture(scope="module")
def client(stack):
    from app.main import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def key(stack):
    return stack.key("evaluator")


def items(n: int = 16) -> list[dict]:
    rng = random.Random(3)
    return [{"question": f"What goes with item {i}?", "choices": rng.sample(WORDS, 4), "answer": rng.randrange(4)}
            for i in range(n)]


def lm_eval_scores(tmp_path, live, key: str, model: str, tokenizer: str, data: str) -> tuple[dict, list]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path / "tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "sbora_mc.yaml").write_text(
        "task: sbora_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    results = simple_evaluate(
        model="local-completions",
        model_args={"model": model, "base_url": f"{live.url}/v1/completions", "tokenizer": tokenizer,
                    "tokenizer_backend": "huggingface", "batch_size": 8, "max_retries": 1},
        tasks=["sbora_mc"], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)
    samples = sorted(results["samples"]["sbora_mc"], key=lambda s: s["doc_id"])
    return results["results"]["sbora_mc"], samples


def test_lm_eval_local_completions_matches_the_server_s_own_evaluation(stack, client, key, tmp_path, tiny_model_dir,
                                                                       monkeypatch):
    headers = {"Authorization": f"Bearer {key}"}
    records = items()
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = client.post("/datasets", headers=headers, files={"file": ("mc.jsonl", data.read_bytes())}).json()["id"]
    train_set = client.post("/datasets", headers=headers, files={"file": ("c.jsonl", chat_lines(16))}).json()["id"]
    adapter = train_tiny_adapter(client, headers, train_set)["adapter_id"]
    evaluation = client.post("/evaluations", headers=headers, json={
        "dataset_id": dataset, "grader": "multiple_choice", "candidates": [TINY, adapter]}).json()
    done = wait_for(lambda: (e := client.get(f"/evaluations/{evaluation['id']}", headers=headers).json())["status"]
                    in ("succeeded", "failed") and e, 300, 0.3, "the server's evaluation")
    assert done["status"] == "succeeded", done["error"]
    own = {c["label"]: c["metrics"] for c in done["result"]["candidates"]}

    monkeypatch.setenv("OPENAI_API_KEY", key)  # local-completions sends it as the bearer token
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    live = LiveServer(client.app)
    try:
        for model in (TINY, adapter):
            scores, samples = lm_eval_scores(tmp_path, live, key, model, str(tiny_model_dir), str(data))
            assert scores["acc,none"] == own[model]["accuracy"]["value"], model
            assert scores["acc_norm,none"] == own[model]["accuracy_norm"]["value"], model
            mine = client.get(f"/evaluations/{evaluation['id']}/items", headers=headers,
                              params={"candidate": model, "limit": 100}).json()["data"]
            for sample, item in zip(samples, mine, strict=True):
                theirs = [ll for ll, _ in sample["filtered_resps"]]
                assert theirs == pytest.approx(item["output"]["logprobs"], abs=1e-4)
                assert sample["acc"] == float(item["correct"])
    finally:
        live.stop()
