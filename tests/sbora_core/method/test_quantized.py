"""QSBoRA: SBoRA on bitsandbytes 4-bit (NF4) and 8-bit bases, on the CPU."""

import pytest
import torch

from sbora_core.method.adapter_io import apply_adapter, load_adapter, save_adapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import adapter_from_model, adapter_layers, inject_adapter
from sbora_core.method.linear import is_quantized_linear
from sbora_core.method.merge import export_merged
from sbora_core.method.models import load_base_model


def train_steps(model, batch, params, steps=12, lr=1e-2):
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("quantization", "variant"), [("nf4", "sbora_fa"), ("nf4", "sbora_fb"), ("int8", "sbora_fa"),
                                                             ("int8", "sbora_fb")])
def test_training_on_quantized_base_lowers_loss(tiny_model_dir, batch, quantization, variant):
    base = load_base_model(str(tiny_model_dir), quantization=quantization, device="cpu")
    layers = inject_adapter(base.model, SBoRAConfig(variant=variant, r=8, alpha=16, base_fingerprint=base.fingerprint))
    assert all(is_quantized_linear(layer.base_layer) for layer in layers.values())
    assert not any(layer.merged for layer in layers.values()), "quantised bases use the unmerged forward"
    params = [p for p in base.model.parameters() if p.requires_grad]
    losses = train_steps(base.model, batch, params)
    assert losses[-1] < losses[0] - 0.05, losses
    with pytest.raises(ValueError, match="quantised"):
        next(iter(layers.values())).merge()


def test_nf4_adapter_exports_to_full_precision_merged_model(tiny_model_dir, batch, tmp_path):
    base = load_base_model(str(tiny_model_dir), quantization="nf4", device="cpu")
    config = SBoRAConfig(r=8, alpha=16, base_fingerprint=base.fingerprint)
    inject_adapter(base.model, config)
    train_steps(base.model, batch, [p for p in base.model.parameters() if p.requires_grad], steps=4)
    save_adapter(adapter_from_model(base.model, config), tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")

    merged_dir = export_merged(str(tiny_model_dir), [adapter], tmp_path / "merged")
    merged = load_base_model(str(merged_dir), device="cpu")
    assert not any(True for _ in adapter_layers(merged.model))
    unmerged = load_base_model(str(tiny_model_dir), device="cpu")
    apply_adapter(unmerged.model, adapter, unmerged.fingerprint, fast_path=False)
    with torch.no_grad():
        expected = unmerged.model(input_ids=batch["input_ids"]).logits
        got = merged.model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
