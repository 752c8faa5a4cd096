"""Shared fixtures: tiny real models built from a config, and the default model cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sbora_core.testing import build_tiny_model


def pytest_configure(config: pytest.Config) -> None:
    # Keep tests to the machine's cores and make CPU math repeatable.
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    reason = pytest.mark.skip(reason="needs a CUDA GPU and torch sees none (run `make TORCH_SPEC=torch test` on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(reason)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture as tiny_model_dir, different weights (so a different fingerprint)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-other", seed=1)


@pytest.fixture(scope="module")
def live(stack):
    """The app under a real uvicorn server on a free port, over the module's `stack`."""
    from stack import LiveServer

    from app.main import create_app

    server = LiveServer(create_app())
    yield server
    server.stop()
