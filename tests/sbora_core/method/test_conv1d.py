"""GPT-2's Conv1D stores its weight transposed, (d_in, d_out). SBoRA means the same on it as on the
equivalent nn.Linear: FA selects input features, FB output features. The two layers, holding the same
weights and the same adapter, must agree on outputs, gradients, merged weights and exports."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sbora_core.method.adapter_io import export_peft
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import adapter_from_model, inject_adapter

D_IN, D_OUT, R = 24, 40, 4


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def twin_layers() -> tuple[Holder, Holder]:
    torch.manual_seed(0)
    conv = Conv1D(D_OUT, D_IN)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    linear = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return Holder(conv), Holder(linear)


def adapted(variant: str) -> tuple[Holder, Holder, SBoRAConfig]:
    config = SBoRAConfig(variant=variant, r=R, alpha=2 * R, dropout=0.0, target_modules=["proj"])
    conv, linear = twin_layers()
    factors = None
    for model in (conv, linear):
        layer = inject_adapter(model, config, fast_path=False)["proj"]
        if factors is None:
            factors = [torch.randn_like(p) for p in layer.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, value in zip([p for p in layer.parameters() if p.requires_grad], factors, strict=True):
                p.copy_(value)
    return conv, linear, config


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_conv1d_and_linear_agree_on_outputs_and_gradients(variant):
    conv, linear, _ = adapted(variant)
    if variant != "lora":  # drawn from the same seed, name and dimension
        assert torch.equal(conv.proj.sbora_indices, linear.proj.sbora_indices)
    x = torch.randn(3, 5, D_IN)
    results = []
    for model in (conv, linear):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        (out * torch.linspace(-1, 1, D_OUT)).sum().backward()
        grads = [p.grad for p in model.proj.parameters() if p.requires_grad]
        results.append((out.detach(), xi.grad, grads))
    (out_c, gx_c, g_c), (out_l, gx_l, g_l) = results
    torch.testing.assert_close(out_c, out_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_l, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_c, g_l, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb"])
def test_merges_touch_the_same_features_and_unmerge_exactly(variant):
    conv, linear, _ = adapted(variant)
    before = conv.proj.base_layer.weight.detach().clone()
    conv.proj.merge()
    linear.proj.merge()
    merged_conv = conv.proj.base_layer.weight.detach()
    assert torch.equal(merged_conv.T, linear.proj.base_layer.weight.detach())  # same values, bit for bit
    # FA changes input features (Conv1D rows, Linear columns); FB output features.
    changed = (merged_conv != before).any(dim=1 if variant == "sbora_fa" else 0).nonzero().flatten()
    assert torch.equal(changed, conv.proj.sbora_indices.sort().values)
    x = torch.randn(2, 3, D_IN)
    torch.testing.assert_close(conv(x), linear(x), rtol=1e-5, atol=1e-5)
    conv.proj.unmerge()
    assert torch.equal(conv.proj.base_layer.weight, before)


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_exports_are_the_same_adapter(variant, tmp_path):
    from safetensors.torch import load_file

    conv, linear, config = adapted(variant)
    from_conv, from_linear = adapter_from_model(conv, config), adapter_from_model(linear, config)
    assert from_conv.metadata.get("fan_in_fan_out") is True and "fan_in_fan_out" not in from_linear.metadata
    for name, delta in from_conv.modules.items():
        other = from_linear.modules[name]
        for field in ("indices", "A", "B"):
            a, b = getattr(delta, field, None), getattr(other, field, None)
            assert (a is None and b is None) or torch.equal(a, b), field
    # PEFT's layout: the same factors; only fan_in_fan_out tells PEFT the base is stored transposed.
    conv_dir, linear_dir = export_peft(from_conv, tmp_path / "conv"), export_peft(from_linear, tmp_path / "linear")
    conv_tensors, linear_tensors = load_file(conv_dir / "adapter_model.safetensors"), \
        load_file(linear_dir / "adapter_model.safetensors")
    assert conv_tensors.keys() == linear_tensors.keys()
    assert all(torch.equal(conv_tensors[k], linear_tensors[k]) for k in conv_tensors)
    assert '"fan_in_fan_out": true' in (conv_dir / "adapter_config.json").read_text()
