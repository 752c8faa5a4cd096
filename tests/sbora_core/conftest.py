from __future__ import annotations

import pytest
import torch

from sbora_core.method.models import BaseModel, load_base_model


@pytest.fixture
def tiny(tiny_model_dir) -> BaseModel:
    """A fresh copy of the tiny model for each test (tests modify weights)."""
    return load_base_model(str(tiny_model_dir), device="cpu")


@pytest.fixture
def batch(tiny) -> dict[str, torch.Tensor]:
    """A fixed batch of two short texts with next-token labels."""
    enc = tiny.tokenizer(
        ["The quick brown fox jumps over the lazy dog.", "SBoRA updates only a few columns."],
        return_tensors="pt",
        padding=True,
    )
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
