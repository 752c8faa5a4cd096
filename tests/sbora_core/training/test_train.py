"""The training loop on a tiny model: learning, cancel, checkpoint/resume, determinism."""

import json

import pytest
import torch

from sbora_core.method.adapter_io import load_adapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.models import load_base_model
from sbora_core.training.data import load_examples
from sbora_core.training.evaluate import validation_loss
from sbora_core.training.job import Hyperparameters, TrainJob
from sbora_core.training.tokenization import tokenize_examples
from sbora_core.training.train import Callbacks, lr_factor, train

COLOURS = ["red", "green", "blue", "black", "white", "pink", "grey", "gold"]


def write_dataset(path, n, offset=0):
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            colour = COLOURS[i % len(COLOURS)]
            record = {"messages": [
                {"role": "user", "content": f"Item {i}: which colour?"},
                {"role": "assistant", "content": f"The colour is {colour}."},
            ]}
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def files(tmp_path):
    return write_dataset(tmp_path / "train.jsonl", 48), write_dataset(tmp_path / "val.jsonl", 8, offset=100)


def make_job(tiny_model_dir, files, out, variant="sbora_fa", **hp):
    defaults = {"max_steps": 12, "batch_size": 4, "learning_rate": 1e-2, "max_seq_len": 128, "seed": 7}
    return TrainJob(
        base_model=str(tiny_model_dir),
        train_file=str(files[0]),
        val_file=str(files[1]),
        output_dir=str(out),
        sbora=SBoRAConfig(variant=variant, r=8, alpha=16, dropout=0.1),
        hyperparameters=Hyperparameters(**{**defaults, **hp}),
        device="cpu",
    )


class Recorder(Callbacks):
    def __init__(self, cancel_after=None):
        self.progress, self.evals, self.checkpoints, self.logs = [], [], [], []
        self.checkpoint_metrics = []
        self.cancel_after = cancel_after

    def on_progress(self, progress):
        self.progress.append(progress)

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics))

    def on_checkpoint(self, step, path, metrics=None):
        self.checkpoints.append((step, path))
        self.checkpoint_metrics.append(metrics)

    def on_log(self, message):
        self.logs.append(message)

    def should_cancel(self):
        return self.cancel_after is not None and len(self.progress) >= self.cancel_after


def factors(adapter_dir):
    adapter = load_adapter(adapter_dir)
    return {f"{n}.{k}": t for n, d in adapter.modules.items() for k, t in d.factors().items()}


def test_short_run_lowers_validation_loss_and_reports(tiny_model_dir, files, tmp_path):
    base = load_base_model(str(tiny_model_dir), device="cpu")
    val = tokenize_examples(base.tokenizer, load_examples(files[1]), 128)
    before = validation_loss(base.model, val, 8, base.tokenizer.pad_token_id)

    rec = Recorder()
    result = train(make_job(tiny_model_dir, files, tmp_path / "out", max_steps=30, eval_every=10), rec)
    assert result.status == "succeeded"
    assert result.metrics["val_loss"] < before - 0.3, (before, result.metrics["val_loss"])
    assert [s for s, _ in rec.evals] == [10, 20, 30]  # the last step was an eval step: not evaluated twice
    assert [p.step for p in rec.progress] == list(range(1, 31))
    last = rec.progress[-1]
    assert last.total_steps == 30 and last.tokens_per_s > 0 and last.eta_s == 0 and last.tokens > 0

    adapter = load_adapter(result.adapter_dir)
    assert adapter.fingerprint == base.fingerprint
    metrics = adapter.metadata["metrics"]
    assert metrics["steps"] == 30 and metrics["trainable_params"] == adapter.trainable_params()
    assert metrics["val_loss"] == result.metrics["val_loss"] and metrics["wall_time_s"] > 0
    assert adapter.metadata["device"] == "cpu" and adapter.metadata["device_name"].startswith("CPU")


def test_cancel_stops_at_the_next_step_and_keeps_a_checkpoint(tiny_model_dir, files, tmp_path):
    rec = Recorder(cancel_after=3)
    result = train(make_job(tiny_model_dir, files, tmp_path / "out"), rec)
    assert result.status == "cancelled" and result.adapter_dir is None
    assert len(rec.progress) == 3
    assert result.last_checkpoint is not None and result.last_checkpoint.name == "step-0000003"


@pytest.mark.parametrize("variant", ["sbora_fa", "sbora_fb", "lora"])
def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny_model_dir, files, tmp_path, variant):
    straight = train(make_job(tiny_model_dir, files, tmp_path / "a", variant, grad_accum=2, checkpoint_every=4))

    interrupted_job = make_job(tiny_model_dir, files, tmp_path / "b", variant, grad_accum=2, checkpoint_every=4)
    first = train(interrupted_job, Recorder(cancel_after=6))
    assert first.status == "cancelled" and first.last_checkpoint.name == "step-0000006"
    rec = Recorder()
    resumed = train(interrupted_job, rec)
    assert resumed.status == "succeeded"
    assert rec.progress[0].step == 7, "resumed run must continue after the checkpoint"
    assert any("resumed from step-0000006" in line for line in rec.logs)

    a, b = factors(straight.adapter_dir), factors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed adapter differs from the uninterrupted one"
    assert any(t.abs().sum() > 0 for t in a.values())


def test_same_seed_same_adapter_other_seed_differs(tiny_model_dir, files, tmp_path):
    one = factors(train(make_job(tiny_model_dir, files, tmp_path / "1", max_steps=4)).adapter_dir)
    two = factors(train(make_job(tiny_model_dir, files, tmp_path / "2", max_steps=4)).adapter_dir)
    three = factors(train(make_job(tiny_model_dir, files, tmp_path / "3", max_steps=4, seed=8)).adapter_dir)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(one[k], three[k]) for k in one)


def test_checkpoints_are_pruned(tiny_model_dir, files, tmp_path):
    rec = Recorder()
    train(make_job(tiny_model_dir, files, tmp_path / "out", max_steps=8, checkpoint_every=2, keep_checkpoints=2), rec)
    assert [s for s, _ in rec.checkpoints] == [2, 4, 6, 8]
    remaining = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert remaining == ["step-0000006", "step-0000008"]


def test_bad_dataset_fails_before_loading_the_model(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    job = TrainJob(base_model="no-such-model", train_file=str(tmp_path / "bad.jsonl"), output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match='line 1: missing field "completion"'):
        train(job)


def test_learning_rate_schedule():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("learning_rate", 0), ("batch_size", 0), ("schedule", "step"), ("max_steps", -1), ("val_fraction", 1.5)],
)
def test_bad_hyperparameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        Hyperparameters(**{field: value})


def test_job_file_layout_round_trips():
    job = TrainJob.from_dict({
        "base_model": "m", "train_file": "t.jsonl", "output_dir": "o",
        "method": {"variant": "sbora_fb", "r": 4}, "hyperparameters": {"max_steps": 3},
    })
    assert job.sbora.variant == "sbora_fb" and job.hyperparameters.max_steps == 3
    assert TrainJob.from_dict(job.to_dict()) == job
    with pytest.raises(ValueError, match=r"^method.rank: unknown field"):
        TrainJob.from_dict({"base_model": "m", "train_file": "t", "output_dir": "o", "method": {"rank": 4}})


def test_checkpoints_record_train_and_validation_token_accuracy(tiny_model_dir, files, tmp_path):
    """Each checkpoint records OpenAI's train_loss, train_mean_token_accuracy, valid_loss and
    valid_mean_token_accuracy (one validation batch, taken in turn); the end, the full validation set."""
    from sbora_core.method.adapter_io import apply_adapter
    from sbora_core.training.evaluate import validation_metrics

    rec = Recorder()
    result = train(make_job(tiny_model_dir, files, tmp_path / "out", max_steps=8, checkpoint_every=4,
                            eval_batch_size=4, keep_checkpoints=2), rec)
    assert [m["step"] for m in rec.checkpoint_metrics] == [4, 8]
    base = load_base_model(str(tiny_model_dir), device="cpu")
    val = tokenize_examples(base.tokenizer, load_examples(files[1]), 128)
    for (step, path), metrics, batch in zip(rec.checkpoints, rec.checkpoint_metrics, (val[4:8], val[0:4]), strict=True):
        assert metrics["train_loss"] == pytest.approx(rec.progress[step - 1].loss)
        assert 0 < metrics["train_mean_token_accuracy"] <= 1
        model = load_base_model(str(tiny_model_dir), device="cpu")
        apply_adapter(model.model, load_adapter(path), model.fingerprint)
        expected = validation_metrics(model.model, batch, 4, model.tokenizer.pad_token_id)
        assert metrics["valid_loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert metrics["valid_mean_token_accuracy"] == pytest.approx(expected["mean_token_accuracy"])
    # The answers repeat across items: training makes the model predict more of them.
    final = validation_metrics(model.model, val, 4, model.tokenizer.pad_token_id)
    assert result.metrics["full_valid_loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert result.metrics["full_valid_mean_token_accuracy"] == pytest.approx(final["mean_token_accuracy"])
    assert 0 < result.metrics["train_mean_token_accuracy"] <= 1
