"""Adapter files: round trip, compatibility checks, PEFT export, composition."""

import json

import pytest
import torch

from sbora_core.method.adapter_io import (
    AdapterFormatError,
    AdapterMismatchError,
    apply_adapter,
    export_peft,
    load_adapter,
    save_adapter,
)
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import adapter_from_model, inject_adapter, remove_adapter
from sbora_core.method.merge import AdapterOverlapError, merge_adapters
from sbora_core.method.models import load_base_model


def trained_adapter(base, variant="sbora_fa", r=4, seed=0, index_seed=0, targets=None):
    config = SBoRAConfig(variant=variant, r=r, alpha=2 * r, index_seed=index_seed, base_fingerprint=base.fingerprint)
    if targets:
        config.target_modules = targets
    layers = inject_adapter(base.model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for p in (layer.sbora_A, layer.sbora_B):
                if p is not None:
                    p.normal_(std=0.05)
    adapter = adapter_from_model(base.model, config, {"note": "test"})
    remove_adapter(base.model)
    return adapter


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_save_load_round_trip_gives_same_logits(tiny, tiny_model_dir, batch, tmp_path, variant):
    adapter = trained_adapter(tiny, variant)
    save_adapter(adapter, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    assert loaded.config == adapter.config and loaded.metadata == {"note": "test"}
    for name, delta in adapter.modules.items():
        for key, value in delta.factors().items():
            assert torch.equal(value, loaded.modules[name].factors()[key])

    reference = load_base_model(str(tiny_model_dir), device="cpu")
    apply_adapter(reference.model, adapter, reference.fingerprint, fast_path=False)
    apply_adapter(tiny.model, loaded, tiny.fingerprint)
    torch.testing.assert_close(logits(tiny.model, batch), logits(reference.model, batch), rtol=1e-4, atol=1e-5)


def test_sbora_file_is_about_half_of_lora(tiny, tmp_path):
    fa = save_adapter(trained_adapter(tiny, "sbora_fa", r=8), tmp_path / "fa")
    lora = save_adapter(trained_adapter(tiny, "lora", r=8), tmp_path / "lora")
    ratio = (fa / "adapter_model.safetensors").stat().st_size / (lora / "adapter_model.safetensors").stat().st_size
    assert ratio < 0.6


def test_fingerprint_mismatch_is_rejected(tiny, other_tiny_model_dir):
    adapter = trained_adapter(tiny)
    other = load_base_model(str(other_tiny_model_dir), device="cpu")
    assert other.fingerprint != tiny.fingerprint
    with pytest.raises(AdapterMismatchError, match="^base_model: the adapter was trained on"):
        apply_adapter(other.model, adapter, other.fingerprint)
    assert not any("sbora" in n for n, _ in other.model.named_parameters())


def test_shape_mismatch_names_the_first_layer(tiny, tmp_path):
    adapter = trained_adapter(tiny)
    save_adapter(adapter, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    first = sorted(raw["modules"])[0]
    raw["modules"][first] = [99, raw["modules"][first][1]]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterFormatError, match=rf"^{first}: factor shapes"):
        load_adapter(tmp_path / "a")
    adapter.modules[first].shape = (99, adapter.modules[first].shape[1])
    with pytest.raises(AdapterMismatchError, match=rf"^{first}: adapter expects shape"):
        apply_adapter(tiny.model, adapter, tiny.fingerprint)


def test_corrupted_weights_file_is_reported(tiny, tmp_path):
    save_adapter(trained_adapter(tiny), tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterFormatError, match="unreadable"):
        load_adapter(tmp_path / "a")


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb"])
def test_peft_export_loads_in_peft_with_same_logits(tiny, tiny_model_dir, batch, tmp_path, variant):
    from peft import PeftModel

    adapter = trained_adapter(tiny, variant)
    export_peft(adapter, tmp_path / "peft", str(tiny_model_dir))
    apply_adapter(tiny.model, adapter, tiny.fingerprint)
    ours = logits(tiny.model, batch)

    base = load_base_model(str(tiny_model_dir), device="cpu")
    peft_model = PeftModel.from_pretrained(base.model, tmp_path / "peft")
    theirs = logits(peft_model, batch)
    assert (ours - theirs).abs().max().item() <= 1e-4
    with peft_model.disable_adapter():
        plain = logits(peft_model, batch)
    assert (theirs - plain).abs().max().item() > 1e-3, "the exported adapter must change the output"


def test_disjoint_adapters_compose_and_unmerge_bit_exactly(tiny, tiny_model_dir, batch):
    first = trained_adapter(tiny, "sbora_fa", index_seed=1, seed=1, targets=["q_proj"])
    second = trained_adapter(tiny, "sbora_fa", index_seed=2, seed=2, targets=["q_proj"])
    # Make the second adapter's columns disjoint from the first's on every layer.
    for name, delta in second.modules.items():
        taken = set(first.modules[name].indices.tolist())
        free = [i for i in range(delta.shape[1]) if i not in taken][: delta.r]
        delta.indices = torch.tensor(free)
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    handle = merge_adapters(tiny.model, [first, second])
    together = logits(tiny.model, batch)
    handle.unmerge()
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())

    one = merge_adapters(tiny.model, [first])
    two = merge_adapters(tiny.model, [second])
    torch.testing.assert_close(logits(tiny.model, batch), together, rtol=1e-5, atol=1e-6)
    two.unmerge()
    one.unmerge()


def test_overlapping_adapters_are_rejected_naming_layer_and_indices(tiny):
    first = trained_adapter(tiny, "sbora_fa", index_seed=1, targets=["q_proj"])
    second = trained_adapter(tiny, "sbora_fa", index_seed=1, seed=5, targets=["q_proj"])
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    name = sorted(first.modules)[0]
    shared = first.modules[name].indices.tolist()[0]
    first.name, second.name = "ad_first", "ad_second"
    with pytest.raises(AdapterOverlapError, match=rf"^adapters ad_first and ad_second overlap in {name}, in columns {shared}"):
        merge_adapters(tiny.model, [first, second])
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb"])
def test_merge_writes_the_region_and_refuses_a_factor_turned_non_finite(tiny, variant):
    adapter = trained_adapter(tiny, variant, targets=["q_proj", "down_proj"])
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    name, delta = sorted(adapter.modules.items())[0]
    weight = tiny.model.get_submodule(name).weight
    merge_adapters(tiny.model, [adapter]).unmerge()  # a first merge passes (and remembers it checked)

    handle = merge_adapters(tiny.model, [adapter])
    if variant == "sbora_fa":
        torch.testing.assert_close(weight[:, delta.indices], before[f"{name}.weight"][:, delta.indices] + delta.scaling * delta.B)
    else:
        torch.testing.assert_close(weight[delta.indices], before[f"{name}.weight"][delta.indices] + delta.scaling * delta.A)
    handle.unmerge()

    with pytest.raises(ValueError, match="non-finite"):  # the checked factors, shared, scaled past float32
        merge_adapters(tiny.model, [adapter.scaled(1e39)])

    factor = delta.B if variant == "sbora_fa" else delta.A
    factor[0, 0] = float("nan")  # changed in place after the checked merge
    with pytest.raises(ValueError, match=f"{name}: merging would write non-finite values"):
        merge_adapters(tiny.model, [adapter])
    factor[0, 0] = 1e38
    with pytest.raises(ValueError, match="non-finite"):
        merge_adapters(tiny.model, [adapter])
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


def test_composition_is_the_exact_weighted_sum(tiny, batch):
    """Two adapters in disjoint slots of one seed: their registered sum, merged, changes the weights as
    the two merged one by one, each scaled by its weight; and unmerging restores them bit for bit."""
    from sbora_core.method.merge import compose_adapters

    parts = []
    for slot, seed in ((0, 1), (1, 2)):
        config = SBoRAConfig(variant="sbora_fa", r=4, alpha=8, index_seed=3, index_slot=slot,
                             base_fingerprint=tiny.fingerprint, target_modules=["q_proj", "down_proj"] if slot else
                             ["q_proj"])
        layers = inject_adapter(tiny.model, config)
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in layers.values():
                layer.trainable.normal_(std=0.05)
        parts.append(adapter_from_model(tiny.model, config))
        remove_adapter(tiny.model)
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    composed = compose_adapters(parts, [0.5, 2.0])
    assert composed.config.r == 8 and len(composed.modules) == len(set(parts[0].modules) | set(parts[1].modules))
    handle = merge_adapters(tiny.model, [composed])
    summed = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    handle.unmerge()
    handle = merge_adapters(tiny.model, [parts[0].scaled(0.5), parts[1].scaled(2.0)])
    for n, p in tiny.model.named_parameters():
        torch.testing.assert_close(p, summed[n], rtol=0, atol=1e-7)
    handle.unmerge()
    assert all(torch.equal(p, before[n]) for n, p in tiny.model.named_parameters())
