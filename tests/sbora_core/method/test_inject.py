"""Injecting adapters into a real (tiny) transformers model."""

import pytest
import torch

from sbora_core.method.config import LLAMA_PROJECTIONS, SBoRAConfig
from sbora_core.method.inject import (
    adapter_layers,
    draw_indices,
    inject_adapter,
    remove_adapter,
    trainable_parameters,
)


def test_targets_the_seven_projections_and_freezes_the_rest(tiny):
    layers = inject_adapter(tiny.model, SBoRAConfig(r=4))
    n_layers = tiny.model.config.num_hidden_layers
    assert len(layers) == 7 * n_layers
    assert {n.split(".")[-1] for n in layers} == set(LLAMA_PROJECTIONS)
    trainable = [n for n, p in tiny.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.split(".")[-1] == "sbora_B" for n in trainable)


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_model_trainable_count_matches_formula(tiny, variant):
    r = 4
    layers = inject_adapter(tiny.model, SBoRAConfig(variant=variant, r=r))
    expected = 0
    for layer in layers.values():
        d_out, d_in = layer.out_features, layer.in_features
        expected += {"sbora_fa": d_out * r, "sbora_fb": r * d_in, "lora": r * (d_in + d_out)}[variant]
    assert trainable_parameters(tiny.model) == expected


def test_unknown_target_lists_existing_modules(tiny):
    with pytest.raises(ValueError, match=r"^target_modules: \['qkv'\].*q_proj"):
        inject_adapter(tiny.model, SBoRAConfig(target_modules=["qkv"]))


@pytest.mark.parametrize(("variant", "too_big"), [("sbora_fa", 65), ("sbora_fb", 129)])
def test_rank_larger_than_selected_dimension_is_rejected(tiny, variant, too_big):
    # hidden 64, intermediate 128: FA selects from d_in (64 for most), FB from d_out (k_proj: 32).
    with pytest.raises(ValueError, match=r"^r: rank"):
        inject_adapter(tiny.model, SBoRAConfig(variant=variant, r=too_big))
    assert not list(adapter_layers(tiny.model)), "a rejected config must leave the model untouched"


def test_all_linear_skips_the_output_head(tiny):
    layers = inject_adapter(tiny.model, SBoRAConfig(r=2, target_modules="all-linear"))
    assert layers and not any(n.endswith("lm_head") for n in layers)


def test_index_sets_are_reproducible_and_distinct():
    a = draw_indices(100, 10, seed=3, module_name="x")
    assert torch.equal(a, draw_indices(100, 10, seed=3, module_name="x"))
    assert a.unique().numel() == 10 and int(a.max()) < 100
    assert not torch.equal(a, draw_indices(100, 10, seed=4, module_name="x"))
    assert not torch.equal(a, draw_indices(100, 10, seed=3, module_name="y"))


def test_remove_restores_model_bit_exactly(tiny, batch):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with torch.no_grad():
        logits_before = tiny.model(input_ids=batch["input_ids"]).logits
    layers = inject_adapter(tiny.model, SBoRAConfig(r=4))
    with torch.no_grad():
        for layer in layers.values():
            layer.trainable.normal_()
        changed = tiny.model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(changed, logits_before)
    remove_adapter(tiny.model)
    after = tiny.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb"])
def test_fast_path_model_matches_unmerged_model(tiny, tiny_model_dir, batch, variant):
    from sbora_core.method.models import load_base_model

    other = load_base_model(str(tiny_model_dir), device="cpu")
    fast = inject_adapter(tiny.model, SBoRAConfig(variant=variant, r=4), fast_path=True)
    plain = inject_adapter(other.model, SBoRAConfig(variant=variant, r=4), fast_path=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for name in fast:
            fast[name].trainable.normal_(std=0.1)
            plain[name].trainable.copy_(fast[name].trainable)
    out_fast = tiny.model(**batch)
    out_plain = other.model(**batch)
    torch.testing.assert_close(out_fast.logits, out_plain.logits, rtol=1e-4, atol=1e-5)
    out_fast.loss.backward()
    out_plain.loss.backward()
    for name in fast:
        torch.testing.assert_close(fast[name].trainable.grad, plain[name].trainable.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_adapter_dropout_follows_the_model_mode(tiny, batch, variant):
    """A model in eval mode gets adapter layers in eval mode: no dropout at inference, even unmerged."""
    assert not tiny.model.training
    layers = inject_adapter(tiny.model, SBoRAConfig(variant=variant, r=4, dropout=0.5), fast_path=False)
    assert not any(layer.training for layer in layers.values())
    with torch.no_grad():
        for layer in layers.values():
            layer.trainable.normal_()
        first, second = (tiny.model(input_ids=batch["input_ids"]).logits for _ in range(2))
    assert torch.equal(first, second)
    tiny.model.train()
    assert all(layer.training for layer in layers.values())
