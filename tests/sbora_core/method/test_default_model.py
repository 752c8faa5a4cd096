"""The real default base model (SmolLM2-135M-Instruct), converted once into the model cache."""

import pytest
import torch

from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import inject_adapter, trainable_parameters
from sbora_core.method.models import (
    DEFAULT_MODEL,
    UnknownModelError,
    load_base_model,
    model_summary,
    resolve_model,
)

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def default_base():
    return load_base_model(DEFAULT_MODEL, device="cpu")


def test_default_model_is_a_real_pretrained_llama(default_base):
    assert default_base.model.config.model_type == "llama"
    assert 130e6 < sum(p.numel() for p in default_base.model.parameters()) < 140e6
    assert default_base.fingerprint.startswith("sha256:")
    prompt = default_base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    ids = default_base.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = default_base.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in default_base.tokenizer.decode(out[0, ids.shape[1]:])


def test_summary_reports_dimensions():
    summary = model_summary(DEFAULT_MODEL)
    assert summary["hidden_size"] == 576 and summary["num_hidden_layers"] == 30
    assert summary["linear_modules"]["down_proj"] == {"d_out": 576, "d_in": 1536}


def test_unknown_name_lists_what_is_available():
    with pytest.raises(UnknownModelError, match=f"unknown model 'no-such-model'.*{DEFAULT_MODEL}"):
        resolve_model("no-such-model")


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(default_base):
    tok = default_base.tokenizer
    texts = [
        "<|im_start|>user\nWhat colour is the sky?<|im_end|>\n<|im_start|>assistant\nSBoRA says: blue.<|im_end|>",
        "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\nSBoRA says: apple.<|im_end|>",
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    batch = {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}
    model = default_base.model
    inject_adapter(model, SBoRAConfig(r=8, alpha=16, base_fingerprint=default_base.fingerprint))
    # FA trains d_out x r per layer: q, k, v, o, gate, up, down outputs of each of 30 blocks.
    assert trainable_parameters(model) == 30 * 8 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
