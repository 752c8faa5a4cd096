"""The model-family matrix: tiny models built from each family's own transformers config, with SBoRA-FA,
SBoRA-FB and LoRA on every linear layer (`all-linear`). For each: training lowers the loss, the adapter
survives a save/load round trip, merging is reversible bit for bit, the PEFT export loads in `peft` with
the same logits, the engine's generation with the adapter equals greedy generation from the merged
model, and a mixed-adapter batch gives each request its solo answer."""

from __future__ import annotations

import json

import pytest
import torch

from sbora_core.method.adapter_io import apply_adapter, export_peft, load_adapter, save_adapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import (
    layer_role,
    remove_adapter,
    select_targets,
)
from sbora_core.method.linear import is_conv1d
from sbora_core.method.merge import merge_adapters
from sbora_core.method.models import load_base_model
from sbora_core.serving.engine import Engine
from sbora_core.serving.generation import SamplingParams
from sbora_core.testing import build_tiny_family, family_configs, random_adapter
from sbora_core.training.job import Hyperparameters, TrainJob
from sbora_core.training.train import Callbacks, train

FAMILIES = list(family_configs(300, 1, 0))
VARIANTS = ["sbora_fa", "sbora_fb", "lora"]
PROMPTS = ["Once upon a time", "The capital of", "x"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return request.param, build_tiny_family(request.param, tmp_path_factory.mktemp(request.param) / "model")


def fresh(family_dir):
    return load_base_model(str(family_dir[1]), device="cpu")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


class Losses(Callbacks):
    def __init__(self):
        self.losses = []

    def on_progress(self, progress):
        self.losses.append(progress.loss)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_lowers_the_loss(family_dir, variant, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Item {i}:", "completion": f" colour {['red', 'blue'][i % 2]}"})
                            + "\n" for i in range(16)))
    losses = Losses()
    job = TrainJob(base_model=str(family_dir[1]), train_file=str(data), output_dir=str(tmp_path / "out"), device="cpu",
                   sbora=SBoRAConfig(variant=variant, r=4, alpha=8),
                   hyperparameters=Hyperparameters(max_steps=12, batch_size=8, learning_rate=2e-2, max_seq_len=64,
                                                   warmup_ratio=0.0, checkpoint_every=None))
    result = train(job, losses)
    assert sum(losses.losses[-3:]) / 3 < sum(losses.losses[:3]) / 3, losses.losses
    assert load_adapter(result.adapter_dir).modules  # every linear layer but the head was adapted


@pytest.mark.parametrize("variant", VARIANTS)
def test_files_merges_and_peft_export(family_dir, variant, tmp_path):
    from peft import PeftModel

    base = fresh(family_dir)
    adapter = random_adapter(base, variant, r=4, std=0.2, seed=1)
    ids = base.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    plain = logits(base.model, ids)

    # Merged, the adapter changes the output; unmerged, every weight is back bit for bit.
    handle = merge_adapters(base.model, [adapter])
    merged = logits(base.model, ids)
    assert not torch.allclose(merged, plain)
    handle.unmerge()
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())

    # The files keep it exactly; applied unmerged, it computes what merged weights compute.
    save_adapter(adapter, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    assert all(torch.equal(t, loaded.modules[n].factors()[k]) for n, d in adapter.modules.items()
               for k, t in d.factors().items())
    apply_adapter(base.model, loaded, base.fingerprint, fast_path=False)
    torch.testing.assert_close(logits(base.model, ids), merged, rtol=1e-4, atol=1e-4)
    remove_adapter(base.model)

    # PEFT reads the export (one-hot fixed factor; fan_in_fan_out on Conv1D) and computes the same.
    export_peft(loaded, tmp_path / "peft", str(family_dir[1]))
    peft_model = PeftModel.from_pretrained(fresh(family_dir).model, str(tmp_path / "peft"))
    torch.testing.assert_close(logits(peft_model, ids), merged, rtol=1e-4, atol=1e-4)


def test_the_engine_serves_adapters_as_merged_weights_would(family_dir):
    base = fresh(family_dir)
    adapters = {v: random_adapter(base, v, r=4, std=0.2, seed=i + 2, index_seed=i) for i, v in enumerate(VARIANTS)}
    greedy = SamplingParams(max_new_tokens=8)
    engine = Engine(base, max_batch_size=8)
    try:
        prompt = {p: engine.tokenizer(p)["input_ids"] for p in PROMPTS}
        alone = {v: engine.generate(prompt[PROMPTS[0]], [a], greedy).text for v, a in adapters.items()}
        # A mixed batch: three requests, three variants, submitted together.
        with engine.cv:
            handles = {v: engine.submit(prompt[PROMPTS[0]], [a], greedy) for v, a in adapters.items()}
        assert {v: h.result().text for v, h in handles.items()} == alone
    finally:
        engine.close()
    for variant, adapter in adapters.items():  # the reference: the weights merged, no adapter applied
        merged = fresh(family_dir)
        merge_adapters(merged.model, [adapter])
        reference = Engine(merged)
        try:
            assert reference.generate(prompt[PROMPTS[0]], [], greedy).text == alone[variant], variant
        finally:
            reference.close()


def test_presets_resolve_per_family(family_dir):
    model = fresh(family_dir).model
    everything = select_targets(model, "all-linear")
    attention, mlp = select_targets(model, "attention"), select_targets(model, "mlp")
    assert attention and mlp and not set(attention) & set(mlp)
    assert set(attention) | set(mlp) == set(everything)  # every layer has a role in these families
    assert all(layer_role(n) == "attention" for n in attention)
    head = model.get_output_embeddings()
    assert all(m is not head for m in everything.values())
    if family_dir[0] == "gpt2":  # GPT-2's layers are Conv1D, adapted all the same
        assert all(is_conv1d(m) for m in everything.values())


def test_a_family_that_bypasses_its_layers_is_refused_by_name():
    """Mamba's mixer passes x_proj/dt_proj/out_proj weights straight to its kernel: an adapter there
    would silently do nothing, so it is refused; in_proj goes through the module and trains."""
    from transformers import AutoModelForCausalLM, MambaConfig

    from sbora_core.method.config import ConfigError
    from sbora_core.method.inject import check_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(MambaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2))
    with pytest.raises(ConfigError, match="read the weights of dt_proj, out_proj, x_proj directly") as caught:
        check_config(model, SBoRAConfig(variant="sbora_fa", r=4, target_modules="all-linear"))
    assert caught.value.field == "target_modules"
    assert set(check_config(model, SBoRAConfig(variant="sbora_fa", r=4, target_modules=["in_proj"]))) == {
        "backbone.layers.0.mixer.in_proj", "backbone.layers.1.mixer.in_proj"}
