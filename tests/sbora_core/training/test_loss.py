"""The supervised loss from hidden states in chunks equals cross-entropy over the model's own logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import inject_adapter
from sbora_core.training import loss as loss_module
from sbora_core.training.loss import LinearCrossEntropy, token_loss_sum


def reference_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunks", ["several", "one"])
def test_chunked_loss_and_gradients_equal_the_full_logits(tiny, batch, monkeypatch, chunks):
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_BYTES", 1 if chunks == "several" else 1 << 30)
    batch = {**batch, "labels": batch["labels"].clone()}
    batch["labels"][0, :4] = -100  # prompt tokens are not targets
    targets = int((batch["labels"][:, 1:] != -100).sum())
    rows = loss_module.chunk_rows(tiny.model.config.vocab_size)
    assert (rows < targets) == (chunks == "several")
    layers = inject_adapter(tiny.model, SBoRAConfig(variant="sbora_fa", r=4, alpha=8))
    for layer in layers.values():
        with torch.no_grad():
            layer.trainable.normal_(0, 0.1)
    assert loss_module._fusable_head(tiny.model) is not None
    grads = []
    for compute in (reference_loss, lambda model, b: token_loss_sum(model, b)[0]):
        tiny.model.zero_grad(set_to_none=True)
        value = compute(tiny.model, batch)
        value.backward()
        grads.append((value.detach(), [layer.trainable.grad.clone() for layer in layers.values()]))
    (expected, expected_grads), (got, got_grads) = grads
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_the_fused_function_matches_autograd_on_random_rows():
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight, labels = torch.randn(30, 8), torch.randint(0, 30, (10,))
    fused, correct = LinearCrossEntropy.apply(hidden, weight, labels, 4)
    (grad_fused,) = torch.autograd.grad(fused * 2.5, hidden)
    logits = hidden @ weight.t()
    plain = F.cross_entropy(logits, labels, reduction="sum")
    (grad_plain,) = torch.autograd.grad(plain * 2.5, hidden)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grad_fused, grad_plain)
    assert int(correct) == int((logits.argmax(-1) == labels).sum())


def test_models_whose_logits_are_not_the_plain_head_keep_their_own_logits(tiny):
    tiny.model.config.model_type = "gemma2"  # soft-caps its logits after the head
    assert loss_module._fusable_head(tiny.model) is None
