"""The GPU recipe: bf16 bases (4-bit and 8-bit ones computing in bf16), fp32 factors and optimiser state.

Marked `cuda`: skipped, with the reason, where torch sees no GPU. On a GPU machine:
`make TORCH_SPEC=torch test PYTEST_ARGS="-m cuda"`.
"""

from __future__ import annotations

import json

import pytest
import torch

from sbora_core.method.adapter_io import load_adapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.merge import merge_adapters
from sbora_core.method.models import load_base_model
from sbora_core.training.job import Hyperparameters, TrainJob
from sbora_core.training.train import Callbacks, train

pytestmark = pytest.mark.cuda


class Recorder(Callbacks):
    def __init__(self, cancel_after=None):
        self.losses, self.cancel_after = [], cancel_after

    def on_progress(self, progress):
        self.losses.append(progress.loss)

    def should_cancel(self):
        return self.cancel_after is not None and len(self.losses) >= self.cancel_after


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    with open(path, "w") as f:
        for i in range(48):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Item {i}: colour?"},
                                             {"role": "assistant", "content": ["red", "blue", "gold"][i % 3]}]}) + "\n")
    return path


def job(tiny_model_dir, data, out, variant="sbora_fa", quantization="none", **hp):
    settings = {"max_steps": 20, "batch_size": 8, "learning_rate": 1e-2, "max_seq_len": 128, "seed": 0,
                "checkpoint_every": 5, **hp}
    return TrainJob(base_model=str(tiny_model_dir), train_file=str(data), output_dir=str(out),
                    sbora=SBoRAConfig(variant=variant, r=8, alpha=16), hyperparameters=Hyperparameters(**settings),
                    quantization=quantization, device="cuda")


@pytest.mark.parametrize("quantization", ["none", "nf4", "int8"])
@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_training_on_a_gpu_lowers_the_loss(tiny_model_dir, data, tmp_path, variant, quantization):
    rec = Recorder()
    result = train(job(tiny_model_dir, data, tmp_path / "out", variant, quantization), rec)
    assert result.status == "succeeded"
    assert sum(rec.losses[-5:]) / 5 < sum(rec.losses[:5]) / 5
    adapter = load_adapter(result.adapter_dir)
    assert all(t.dtype == torch.float32 for d in adapter.modules.values() for t in d.factors().values())
    assert adapter.metadata["device_name"] == torch.cuda.get_device_name()


def test_the_frozen_base_is_bf16_and_the_factors_fp32(tiny_model_dir):
    from sbora_core.method.inject import inject_adapter

    base = load_base_model(str(tiny_model_dir), device="cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert base.model.dtype == expected
    layers = inject_adapter(base.model, SBoRAConfig(r=8, alpha=16))
    assert all(layer.trainable.dtype == torch.float32 and not layer.merged for layer in layers.values())


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_resume_on_a_gpu_gives_the_same_adapter(tiny_model_dir, data, tmp_path, variant):
    straight = train(job(tiny_model_dir, data, tmp_path / "a", variant))
    interrupted = job(tiny_model_dir, data, tmp_path / "b", variant)
    assert train(interrupted, Recorder(cancel_after=10)).status == "cancelled"
    resumed = train(interrupted)
    a, b = load_adapter(straight.adapter_dir), load_adapter(resumed.adapter_dir)
    for name, delta in a.modules.items():
        for key, value in delta.factors().items():
            assert torch.equal(value, b.modules[name].factors()[key]), f"{name}.{key}"


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_merge_and_unmerge_on_a_bf16_base_are_bit_exact(tiny_model_dir, data, tmp_path, variant):
    adapter = load_adapter(train(job(tiny_model_dir, data, tmp_path / "a", variant, max_steps=3)).adapter_dir)
    base = load_base_model(str(tiny_model_dir), device="cuda")
    before = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    handle = merge_adapters(base.model, [adapter])
    changed = [n for n, p in base.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed  # the adapter went in
    handle.unmerge()
    assert all(torch.equal(p, before[n]) for n, p in base.model.named_parameters())
