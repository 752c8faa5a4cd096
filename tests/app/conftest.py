from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from stack import chat_lines, make_stack


@pytest.fixture(scope="module", params=["embedded", "production"])
def stack(request, tmp_path_factory, tiny_model_dir):
    """The whole service on one flavour of database and broker, with one real worker process."""
    stack, teardown = make_stack(request.param, tmp_path_factory.mktemp(request.param), [str(tiny_model_dir)])
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


@pytest.fixture(scope="module")
def dataset(client, alice):
    response = client.post("/datasets", headers=alice, files={"file": ("colours.jsonl", chat_lines(24))})
    assert response.status_code == 201, response.text
    return response.json()
