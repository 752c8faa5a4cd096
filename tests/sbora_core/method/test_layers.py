"""SBoRA layers against the method's definition, on a single linear layer."""

import pytest
import torch
from torch import nn

from sbora_core.method.inject import draw_indices
from sbora_core.method.layers import SBoRALinear, follow_optimizer

D_OUT, D_IN, R = 24, 16, 4


def make_layer(variant: str, *, seed: int = 0, dropout: float = 0.0, random_factor: bool = True) -> SBoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT, bias=True)
    dim = D_IN if variant == "sbora_fa" else D_OUT
    indices = None if variant == "lora" else draw_indices(dim, R, seed, "layer")
    layer = SBoRALinear(base, variant, R, alpha=8.0, dropout=dropout, indices=indices)
    if random_factor:
        with torch.no_grad():
            for p in (layer.sbora_A, layer.sbora_B):
                if p is not None:
                    p.normal_()
    return layer


def dense_delta(layer: SBoRALinear) -> torch.Tensor:
    """ΔW built explicitly from the definition: B·E_I^T (FA), E_J·A (FB), B·A (LoRA)."""
    s = layer.scaling
    if layer.variant.name == "lora":
        return s * layer.sbora_B @ layer.sbora_A
    eye_in, eye_out = torch.eye(D_IN), torch.eye(D_OUT)
    if layer.variant.name == "sbora_fa":
        fixed_A = eye_in[layer.sbora_indices]  # (r, d_in): row k is e_{I_k}
        return s * layer.sbora_B @ fixed_A
    fixed_B = eye_out[:, layer.sbora_indices]  # (d_out, r): column k is e_{J_k}
    return s * fixed_B @ layer.sbora_A


VARIANTS = ["sbora_fa", "sbora_fb", "lora"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("merged", [False, True])
def test_forward_equals_dense_delta(variant, merged):
    layer = make_layer(variant)
    x = torch.randn(3, 5, D_IN)
    expected = x @ (layer.base_layer.weight + dense_delta(layer)).T + layer.base_layer.bias
    if merged:
        layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb"])
def test_delta_is_confined_to_selected_columns_or_rows(variant):
    layer = make_layer(variant)
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    changed = layer.base_layer.weight.detach() != before  # (d_out, d_in)
    selected = torch.zeros(D_OUT, D_IN, dtype=torch.bool)
    if variant == "sbora_fa":
        selected[:, layer.sbora_indices] = True
    else:
        selected[layer.sbora_indices, :] = True
    assert changed.any()
    assert not (changed & ~selected).any(), "weights outside the selected region changed"


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_init_leaves_outputs_unchanged(variant):
    layer = make_layer(variant, random_factor=False)
    x = torch.randn(2, 3, D_IN)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_trainable_factor_requires_grad(variant):
    layer = make_layer(variant)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    expected = {"sbora_fa": {"sbora_B"}, "sbora_fb": {"sbora_A"}, "lora": {"sbora_A", "sbora_B"}}[variant]
    assert trainable == expected
    if variant != "lora":
        assert layer.sbora_indices.dtype == torch.long and layer.sbora_indices.shape == (R,)
    x = torch.randn(2, 3, D_IN)
    layer(x).square().sum().backward()
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    for name in expected:
        assert getattr(layer, name).grad is not None


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb"])
def test_fast_path_matches_unmerged_outputs_and_gradients(variant):
    fast, plain = make_layer(variant), make_layer(variant)
    fast.merge()
    x = torch.randn(4, 7, D_IN)
    x_fast, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(4, 7, D_OUT)
    y_fast, y_plain = fast(x_fast), plain(x_plain)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    (y_fast * grad_out).sum().backward()
    (y_plain * grad_out).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_plain.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.trainable.grad, plain.trainable.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb"])
@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_fast_path_follows_optimiser_steps(variant, fused):
    """After each step the merged region equals W0 + (alpha/r)·factor, as the unmerged layer computes.

    Fused AdamW updates parameters without bumping their version counter; the
    layer learns of each step from the optimiser (as the trainer wires it), and
    never reads the factor back to compare."""
    fast, plain = make_layer(variant, random_factor=False), make_layer(variant, random_factor=False)
    fast.merge()
    opt_fast = torch.optim.AdamW([fast.trainable], lr=0.05, fused=fused)
    follow_optimizer(opt_fast, [fast])
    opt_plain = torch.optim.AdamW([plain.trainable], lr=0.05, fused=fused)
    x, target = torch.randn(8, D_IN), torch.randn(8, D_OUT)
    for _ in range(5):
        for layer, opt in ((fast, opt_fast), (plain, opt_plain)):
            opt.zero_grad()
            (layer(x) - target).square().mean().backward()
            opt.step()
    torch.testing.assert_close(fast.trainable, plain.trainable, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb"])
def test_fast_path_with_dropout_matches_unmerged(variant):
    fast, plain = make_layer(variant, dropout=0.3), make_layer(variant, dropout=0.3)
    fast.merge()
    x = torch.randn(3, 5, D_IN)
    torch.manual_seed(123)
    y_fast = fast(x)
    torch.manual_seed(123)
    y_plain = plain(x)
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-5, atol=1e-5)
    y_fast.sum().backward()
    y_plain.sum().backward()
    torch.testing.assert_close(fast.trainable.grad, plain.trainable.grad, rtol=1e-5, atol=1e-5)
    fast.eval()
    plain.eval()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_then_unmerge_is_bit_exact(variant):
    layer = make_layer(variant)
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, before)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, before)


def test_merge_refuses_non_finite_values_and_leaves_weight_untouched():
    layer = make_layer("sbora_fa")
    before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.sbora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, before)
    assert not layer.merged


@pytest.mark.parametrize(
    ("variant", "count"), [("sbora_fa", D_OUT * R), ("sbora_fb", R * D_IN), ("lora", R * (D_IN + D_OUT))]
)
def test_trainable_parameter_counts(variant, count):
    layer = make_layer(variant)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == count


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb"])
def test_fast_path_sees_in_place_edits_of_the_factor(variant):
    """Edits outside an optimiser (loading a checkpoint, a test's normal_()) bump the version counter."""
    fast, plain = make_layer(variant, random_factor=False), make_layer(variant, random_factor=False)
    fast.merge()
    x = torch.randn(8, D_IN)
    with torch.no_grad():
        fast(x)  # the region is written for the zero factor
        for layer in (fast, plain):
            torch.manual_seed(3)
            layer.trainable.normal_()
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_half_precision_bases_keep_the_adapter_term_separate():
    """Writing W0 + (alpha/r)·B into a bf16 weight would round small updates away: no fast path there."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).to(torch.bfloat16)
    original = base.weight.detach().clone()
    layer = SBoRALinear(base, "sbora_fa", 4, 8.0, indices=draw_indices(D_IN, 4, 0, "l"))
    assert not layer.mergeable_for_training
    opt = torch.optim.AdamW([layer.trainable], lr=1e-5)  # early steps of a real run: tiny updates
    x = torch.randn(8, D_IN, dtype=torch.bfloat16)
    for _ in range(3):
        opt.zero_grad()
        layer(x).float().square().mean().backward()
        opt.step()
    assert torch.equal(base.weight, original)  # the base weight never changes
    assert layer.trainable.dtype == torch.float32 and bool(layer.trainable.abs().sum() > 0)
    # Why: these fp32 factors, merged into the bf16 weight, would mostly vanish in the rounding.
    region = original.index_select(1, layer.sbora_indices)
    merged = (region.float() + layer.scaling * layer.trainable.detach()).to(torch.bfloat16)
    assert (merged == region).float().mean() > 0.5


class _OutputAsView(torch.autograd.Function):
    """y = x W^T returned as a view made inside the function, as bitsandbytes' int8 layer returns it on CUDA."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return (x.reshape(-1, x.shape[-1]) @ weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        return gy @ weight, None


class ViewOutputLinear(nn.Linear):
    def forward(self, x):
        return _OutputAsView.apply(x, self.weight)


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_a_base_whose_output_is_a_custom_functions_view_trains_as_a_plain_one(variant):
    torch.manual_seed(0)
    plain = nn.Linear(16, 12, bias=False)
    viewing = ViewOutputLinear(16, 12, bias=False)
    viewing.load_state_dict(plain.state_dict())
    indices = torch.tensor([1, 5, 6, 11])
    layers = [SBoRALinear(base, variant, r=4, alpha=8, indices=indices if variant != "lora" else None)
              for base in (plain, viewing)]
    with torch.no_grad():  # a non-zero update, the same in both
        layers[0].trainable.copy_(torch.linspace(-1, 1, layers[0].trainable.numel()).view_as(layers[0].trainable))
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 3, 16)
    outputs = [layer(x) for layer in layers]
    torch.testing.assert_close(outputs[1], outputs[0])
    for out in outputs:
        out.square().sum().backward()
    torch.testing.assert_close(layers[1].trainable.grad, layers[0].trainable.grad)
