"""Base models added at run time, on both stacks: admin keys only, checked before anything is
recorded, offered at once to the API, the real worker and the engine, and removable once unused."""

from __future__ import annotations

import json

import pytest
from stack import train_tiny_adapter
from typer.testing import CliRunner

from sbora_core.testing import build_tiny_family


@pytest.fixture(scope="module")
def admin(stack):
    return {"Authorization": f"Bearer {stack.key('operators', scope='admin')}"}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A GPT-2-style model (Conv1D layers) without a chat template, as base models often ship."""
    return build_tiny_family("gpt2", tmp_path_factory.mktemp("local") / "my-gpt2", chat_template=False)


def model_ids(client, headers) -> list[str]:
    response = client.get("/models", headers=headers)
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()]


def prompt_completion_lines(n: int) -> bytes:
    return "".join(json.dumps({"prompt": f"Item {i}: which colour?", "completion": f" {['red', 'blue'][i % 2]}"})
                   + "\n" for i in range(n)).encode()


def test_tenant_keys_cannot_add_or_remove_models(client, alice, gpt2_dir):
    response = client.post("/models", headers=alice, json={"source": str(gpt2_dir)})
    assert response.status_code == 403 and "--admin" in response.json()["detail"]
    assert client.delete("/models/tiny-llama", headers=alice).status_code == 403
    assert client.post("/models", json={"source": str(gpt2_dir)}).status_code == 401
    assert "my-gpt2" not in model_ids(client, alice)


def test_bad_sources_are_refused_and_nothing_is_registered(client, admin, alice, tmp_path, gpt2_dir):
    from transformers import ViTConfig, ViTModel

    before = model_ids(client, alice)
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    vision = tmp_path / "vit"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=16, patch_size=8)).save_pretrained(vision)
    cases = {
        str(tmp_path / "empty"): "no config.json",
        str(tmp_path / "weights.safetensors"): "is a file",
        str(vision): "'vit' is not a causal language model",
        "no-such-org/no-such-model": "could not be fetched from the hub",
        str(tmp_path / "missing"): "unknown model",
    }
    for source, reason in cases.items():
        response = client.post("/models", headers=admin, json={"source": source})
        assert response.status_code == 422, (source, response.text)
        assert reason in response.text and "source" in response.text, (source, response.text)
    response = client.post("/models", headers=admin, json={"source": str(gpt2_dir), "name": "../escape"})
    assert response.status_code == 422 and "name" in response.text
    response = client.post("/models", headers=admin, json={"source": str(gpt2_dir), "name": "tiny-llama"})
    assert response.status_code == 409 and "tiny-llama" in response.text  # the configured model keeps its name
    assert model_ids(client, alice) == before


def test_a_registered_model_trains_serves_and_is_removed_once_unused(client, admin, alice, bob, gpt2_dir):
    response = client.post("/models", headers=admin, json={"source": str(gpt2_dir)})
    assert response.status_code == 201, response.text
    model = response.json()
    assert model["id"] == "my-gpt2" and model["origin"] == "registered" and model["model_type"] == "gpt2"
    assert model["has_chat_template"] is False and model["linear_modules"]["c_attn"] == {"d_out": 192, "d_in": 64}
    # Every tenant sees it, in both listings; registering it twice answers 409.
    assert "my-gpt2" in model_ids(client, bob)
    assert "my-gpt2" in [m["id"] for m in client.get("/v1/models", headers=bob).json()["data"]]
    assert client.post("/models", headers=admin, json={"source": str(gpt2_dir)}).status_code == 409

    # Chat records need the model's chat template, which it lacks: 422 before any training.
    chat = client.post("/datasets", headers=alice, files={"file": ("chat.jsonl", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")})
    response = client.post("/jobs", headers=alice, json={"base_model": "my-gpt2",
                                                         "training_dataset_id": chat.json()["id"]})
    assert response.status_code == 422 and "chat template" in response.text
    assert "training_dataset_id" in response.text

    # Prompt/completion records train on it in the real worker, and the engine serves the result.
    data = client.post("/datasets", headers=alice, files={"file": ("pc.jsonl", prompt_completion_lines(16))}).json()
    job = train_tiny_adapter(client, alice, data["id"], base_model="my-gpt2")
    adapter = client.get(f"/adapters/{job['adapter_id']}/metadata", headers=alice).json()
    assert adapter["base_model"] == "my-gpt2"
    generated = client.post("/generate", headers=alice, json={"adapter_id": adapter["id"], "prompt": "Item 3:",
                                                              "max_new_tokens": 4, "temperature": 0})
    assert generated.status_code == 200, generated.text

    # In use: 409 naming what uses it; once the adapter is gone, it goes, and jobs can no longer name it.
    response = client.delete("/models/my-gpt2", headers=admin)
    assert response.status_code == 409 and "1 adapters" in response.text
    assert client.delete(f"/adapters/{adapter['id']}", headers=alice).status_code == 204
    assert client.delete("/models/my-gpt2", headers=admin).status_code == 204
    assert "my-gpt2" not in model_ids(client, alice)
    response = client.post("/jobs", headers=alice, json={"base_model": "my-gpt2", "training_dataset_id": data["id"]})
    assert response.status_code == 422 and "base_model" in response.text
    assert client.delete("/models/my-gpt2", headers=admin).status_code == 404
    assert client.delete("/models/tiny-llama", headers=admin).status_code == 409  # configured, not registered


def test_the_cli_adds_lists_and_removes_models(stack, client, alice, gpt2_dir, tmp_path):
    from sbora_cli.main import app

    runner = CliRunner()
    added = runner.invoke(app, ["models", "add", str(gpt2_dir), "--name", "cli-gpt2"])
    assert added.exit_code == 0, added.output
    assert "added cli-gpt2: gpt2, 2 layers of width 64" in added.output and "no chat template" in added.output
    assert "cli-gpt2" in model_ids(client, alice)
    listed = runner.invoke(app, ["models"])
    assert "cli-gpt2" in listed.output and "registered" in listed.output and "tiny-llama" in listed.output
    refused = runner.invoke(app, ["models", "add", str(tmp_path)])
    assert refused.exit_code == 1 and "no config.json" in refused.output
    assert runner.invoke(app, ["models", "remove", "cli-gpt2"]).exit_code == 0
    assert "cli-gpt2" not in model_ids(client, alice)
    gone = runner.invoke(app, ["models", "remove", "cli-gpt2"])
    assert gone.exit_code == 1 and "no registered base model" in gone.output


def test_the_catalog_answers_while_every_pooled_connection_is_held(client, alice):
    """Requests hold a pooled connection while they ask the catalog; when it drew a second one, a
    burst of requests (20 clients submitting jobs at once) held them all and waited for the pool's
    timeout: a deadlock answered 500 after 30 s."""
    from app import catalog
    from app.core.db import get_engine

    pool = get_engine().pool
    held = [get_engine().connect() for _ in range(pool.size() + pool._max_overflow)]  # type: ignore[attr-defined]
    try:
        assert "tiny-llama" in catalog.offered(fresh=True)
        assert catalog.source_of("tiny-llama")
    finally:
        for connection in held:
            connection.close()
