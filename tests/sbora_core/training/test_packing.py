"""Packing short examples into full rows, and gradient checkpointing: same training, less waste."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sbora_core.method.adapter_io import load_adapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.models import load_base_model
from sbora_core.training.data import load_examples
from sbora_core.training.job import Hyperparameters, TrainJob
from sbora_core.training.tokenization import IGNORE_INDEX, collate, pack_examples, tokenize_examples
from sbora_core.training.train import Callbacks, train


def write_chats(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Item {i}: colour?"},
                                             {"role": "assistant", "content": ["red", "blue", "gold"][i % 3]}]}) + "\n")
    return path


@pytest.fixture
def chats(tmp_path):
    return write_chats(tmp_path / "chats.jsonl", 24)


def test_rows_keep_every_token_in_order_and_restart_positions(tiny, chats):
    examples = tokenize_examples(tiny.tokenizer, load_examples(chats), 128)
    rows = pack_examples(examples, 128)
    assert len(rows) < len(examples) and all(len(r.input_ids) <= 128 for r in rows)
    assert [t for r in rows for t in r.input_ids] == [t for e in examples for t in e.input_ids]
    starts = [i for r in rows for i, p in enumerate(r.position_ids) if p == 0]
    assert len(starts) == len(examples)  # one restart per example
    # Targets are kept except each example's first label, which packing masks.
    kept = sum(t != IGNORE_INDEX for r in rows for t in r.labels)
    assert kept == sum(t != IGNORE_INDEX for e in examples for t in e.labels[1:])


def token_loss(model, batch):
    inputs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {
        "attention_mask": batch["attention_mask"]}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def test_a_packed_row_scores_each_example_as_if_alone(tiny, chats):
    """No attention across examples: the packed loss equals the examples' own losses."""
    examples = tokenize_examples(tiny.tokenizer, load_examples(chats), 128)
    rows = pack_examples(examples, 96)
    with torch.no_grad():
        packed = token_loss(tiny.model, collate(rows, tiny.tokenizer.pad_token_id))
        alone = sum(token_loss(tiny.model, collate([e], tiny.tokenizer.pad_token_id)) for e in examples)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)


class Losses(Callbacks):
    def __init__(self):
        self.steps = []

    def on_progress(self, progress):
        self.steps.append(progress)


def job(tiny_model_dir, data, out, variant="sbora_fa", quantization="none", **hp):
    settings = {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "max_seq_len": 128, "seed": 3, **hp}
    return TrainJob(base_model=str(tiny_model_dir), train_file=str(data), output_dir=str(out),
                    sbora=SBoRAConfig(variant=variant, r=4, alpha=8, dropout=0.1),
                    hyperparameters=Hyperparameters(**settings), quantization=quantization, device="cpu")


def test_packing_trains_on_fewer_fuller_rows(tiny_model_dir, chats, tmp_path):
    plain, packed = Losses(), Losses()
    train(job(tiny_model_dir, chats, tmp_path / "a", max_steps=None, epochs=3), plain)
    result = train(job(tiny_model_dir, chats, tmp_path / "b", max_steps=None, epochs=3, packing=True), packed)
    assert len(packed.steps) < len(plain.steps)  # the same epochs in fewer steps
    assert packed.steps[-1].tokens == plain.steps[-1].tokens  # over the same tokens
    assert packed.steps[-1].loss < packed.steps[0].loss
    assert result.metrics["train_examples"] < 24


@pytest.mark.parametrize("variant,quantization", [("sbora_fa", "none"), ("sbora_fb", "none"), ("lora", "none"),
                                                  ("sbora_fa", "nf4")])
def test_gradient_checkpointing_trains_the_same_adapter(tiny_model_dir, chats, tmp_path, variant, quantization):
    """Recomputed activations, the same gradients (dropout replayed exactly): the same adapter."""
    plain = train(job(tiny_model_dir, chats, tmp_path / "a", variant, quantization))
    checkpointed = train(job(tiny_model_dir, chats, tmp_path / "b", variant, quantization,
                             gradient_checkpointing=True))
    a, b = load_adapter(plain.adapter_dir), load_adapter(checkpointed.adapter_dir)
    for name, delta in a.modules.items():
        for key, value in delta.factors().items():
            torch.testing.assert_close(b.modules[name].factors()[key], value, rtol=1e-4, atol=1e-6)
    assert checkpointed.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], rel=1e-4)


def test_both_switches_are_validated():
    with pytest.raises(ValueError, match="^packing: must be true or false"):
        Hyperparameters(packing="yes")
    with pytest.raises(ValueError, match="^gradient_checkpointing: must be true or false"):
        Hyperparameters(gradient_checkpointing=1)


def test_a_checkpointed_model_really_recomputes(tiny_model_dir, chats, tmp_path):
    """The switch reaches the model (transformers runs its layers under checkpoint)."""
    from sbora_core.training.train import prepare

    run = prepare(job(tiny_model_dir, chats, tmp_path / "c", gradient_checkpointing=True))
    checkpointing = [m for m in run.model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert checkpointing, "no module runs under activation checkpointing"
    plain = prepare(job(tiny_model_dir, chats, tmp_path / "d")).model
    assert not [m for m in plain.modules() if getattr(m, "gradient_checkpointing", False)]


def test_load_keeps_fp32_on_the_cpu(tiny_model_dir):
    assert load_base_model(str(tiny_model_dir), device="cpu").model.dtype == torch.float32
