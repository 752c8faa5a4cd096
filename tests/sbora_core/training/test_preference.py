"""DPO on a tiny model: the loss math, the reference pass, step 0, learning, resume, continuing an
adapter, and preference files' validation."""

import json
import math

import pytest
import torch

from sbora_core.method.adapter_io import load_adapter
from sbora_core.method.config import ConfigError, SBoRAConfig
from sbora_core.method.inject import inject_adapter
from sbora_core.method.models import load_base_model
from sbora_core.training.data import load_examples, validate_dataset
from sbora_core.training.job import Hyperparameters, Resources, TrainJob
from sbora_core.training.loss import sequence_logps
from sbora_core.training.preference import (
    collate_pairs,
    dpo_loss,
    pair_logps,
    reference_logps,
    tokenize_pairs,
)
from sbora_core.training.train import Callbacks, train

GOOD = ["sun", "tea", "song", "rain", "bread", "lake", "home", "gift", "smile", "book", "tree", "star"]
HELD_OUT = ["moon", "cake", "river", "light"]


def write_pairs(path, words, repeat=4, openai=True):
    """Pairs that differ in a learnable way: "X is good." preferred over "X is bad."."""
    with open(path, "w") as f:
        for k in range(repeat):
            for word in words:
                prompt = f"Say one thing about {word} (take {k})."
                if openai:
                    record = {"input": {"messages": [{"role": "user", "content": prompt}]},
                              "preferred_output": [{"role": "assistant", "content": f"{word} is good."}],
                              "non_preferred_output": [{"role": "assistant", "content": f"{word} is bad."}]}
                else:
                    record = {"prompt": prompt, "chosen": f" {word} is good.", "rejected": f" {word} is bad."}
                f.write(json.dumps(record) + "\n")
    return path


def write_sft(path, words):
    with open(path, "w") as f:
        for word in words:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say one thing about {word} (take 0)."},
                                             {"role": "assistant", "content": f"{word} is fine."}]}) + "\n")
    return path


class Recorder(Callbacks):
    def __init__(self, cancel_after=None):
        self.progress, self.evals, self.logs, self.checkpoints = [], [], [], []
        self.cancel_after = cancel_after
        self.metrics = {}

    def on_progress(self, progress):
        self.progress.append(progress)

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics))

    def on_checkpoint(self, step, path, metrics=None):
        self.checkpoints.append(metrics)

    def on_log(self, message):
        self.logs.append(message)

    def should_cancel(self):
        return self.cancel_after is not None and len(self.progress) >= self.cancel_after


def dpo_job(model_dir, train_file, out, val_file=None, dropout=0.0, **overrides):
    hp = {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "max_seq_len": 96, "seed": 3,
          "warmup_ratio": 0.0, **overrides.pop("hp", {})}
    return TrainJob(base_model=str(model_dir), train_file=str(train_file), val_file=str(val_file) if val_file else None,
                    output_dir=str(out), sbora=SBoRAConfig(r=8, alpha=16, dropout=dropout),
                    hyperparameters=Hyperparameters(**hp), device="cpu", objective="dpo", **overrides)


def held_out_accuracy(model_dir, adapter_dir, pairs_file):
    """Fraction of pairs whose preferred side gained more log-prob than the other (ties count half)."""
    base = load_base_model(str(model_dir), device="cpu")
    pairs = tokenize_pairs(base.tokenizer, load_examples(pairs_file), 96)
    pad = base.tokenizer.pad_token_id
    before = reference_logps(base.model, pairs, 8, pad)
    after = before
    if adapter_dir is not None:
        adapter = load_adapter(adapter_dir)
        layers = inject_adapter(base.model, adapter.config)
        for name, delta in adapter.modules.items():
            layers[name].load_delta(delta)
        after = reference_logps(base.model, pairs, 8, pad)
    gain = (after[:, 0] - before[:, 0]) - (after[:, 1] - before[:, 1])
    return float(((gain > 0).float() + 0.5 * (gain == 0).float()).mean())


def test_dpo_loss_matches_a_hand_computation():
    policy = (torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0]))
    reference = torch.tensor([[-3.5, -3.5], [-4.0, -3.0]])
    losses, chosen, rejected = dpo_loss(policy, reference, beta=0.5)
    # pair 0: margin (0.5) - (-0.5) = 1; pair 1: margin (-1) - (1) = -2
    expected = [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(1.0))]
    assert losses.tolist() == pytest.approx(expected)
    assert chosen.tolist() == pytest.approx([0.25, -0.5]) and rejected.tolist() == pytest.approx([-0.25, 0.5])
    ipo, _, _ = dpo_loss(policy, reference, beta=0.5, loss="ipo")
    assert ipo.tolist() == pytest.approx([(1 - 1.0) ** 2, (-2 - 1.0) ** 2])


def test_sequence_logps_fused_matches_the_logits_and_their_gradients(tiny, batch):
    inject_adapter(tiny.model, SBoRAConfig(r=4, alpha=8))
    for p in tiny.model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    fused = sequence_logps(tiny.model, batch)
    grads_fused = torch.autograd.grad(fused.sum(), [p for p in tiny.model.parameters() if p.requires_grad])
    logits = tiny.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logp = logits.float().log_softmax(-1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    plain = (logp * (labels != -100)).sum(-1)
    grads_plain = torch.autograd.grad(plain.sum(), [p for p in tiny.model.parameters() if p.requires_grad])
    assert fused.shape == (2,) and torch.allclose(fused, plain, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_fused, grads_plain, strict=True))


def test_reference_logps_equal_the_base_models_own(tiny_model_dir, tmp_path):
    base = load_base_model(str(tiny_model_dir), device="cpu")
    pairs = tokenize_pairs(base.tokenizer, load_examples(write_pairs(tmp_path / "p.jsonl", GOOD[:5], 1)), 96)
    expected = []
    for pair in pairs:
        batch = collate_pairs([pair], base.tokenizer.pad_token_id)
        with torch.no_grad():
            expected.append(torch.stack(pair_logps(base.model, batch), 1)[0])
    inject_adapter(base.model, SBoRAConfig(r=8, alpha=16))  # a fresh adapter: ΔW = 0
    got = reference_logps(base.model, pairs, 2, base.tokenizer.pad_token_id)
    assert torch.allclose(got, torch.stack(expected), atol=1e-4)
    assert (got < 0).all() and not torch.equal(got[:, 0], got[:, 1])


def test_step_zero_is_log_2_and_dpo_learns_held_out_preferences(tiny_model_dir, tmp_path):
    train_file = write_pairs(tmp_path / "train.jsonl", GOOD)
    held = write_pairs(tmp_path / "held.jsonl", HELD_OUT, 2, openai=False)
    rec = Recorder()
    result = train(dpo_job(tiny_model_dir, train_file, tmp_path / "out", val_file=held, dropout=0.1,
                           hp={"max_steps": 24, "eval_every": 12}), rec)
    assert result.status == "succeeded"
    assert rec.progress[0].loss == pytest.approx(math.log(2), abs=1e-6)
    assert rec.progress[0].metrics["rewards_margins"] == pytest.approx(0, abs=1e-6)
    first = rec.evals[0][1]
    assert set(first) == {"val_loss", "val_rewards_chosen", "val_rewards_rejected", "val_rewards_margins",
                          "val_rewards_accuracies"}
    assert held_out_accuracy(tiny_model_dir, None, held) == 0.5
    assert held_out_accuracy(tiny_model_dir, result.adapter_dir, held) >= 0.9
    metrics = result.metrics
    assert metrics["objective"] == "dpo" and metrics["train_rewards_margins"] > 0
    assert metrics["full_valid_rewards_accuracies"] >= 0.9 and metrics["full_valid_loss"] < math.log(2)
    assert any("reference log-probs of" in line for line in rec.logs)


def test_dpo_resume_reads_the_reference_back_and_gives_the_same_adapter(tiny_model_dir, tmp_path):
    train_file = write_pairs(tmp_path / "train.jsonl", GOOD[:8], 2)
    straight = train(dpo_job(tiny_model_dir, train_file, tmp_path / "a", dropout=0.1,
                             hp={"checkpoint_every": 2, "grad_accum": 2}))
    job = dpo_job(tiny_model_dir, train_file, tmp_path / "b", dropout=0.1, hp={"checkpoint_every": 2, "grad_accum": 2})
    first = train(job, Recorder(cancel_after=3))
    assert first.status == "cancelled"
    rec = Recorder()
    resumed = train(job, rec)
    assert rec.progress[0].step == 4 and any("resumed from step-0000003" in line for line in rec.logs)
    assert not any("reference log-probs" in line for line in rec.logs), "resume recomputed the reference"
    a, b = load_adapter(straight.adapter_dir), load_adapter(resumed.adapter_dir)
    assert all(torch.equal(a.modules[n].B, b.modules[n].B) for n in a.modules)
    assert any(a.modules[n].B.abs().sum() > 0 for n in a.modules)


def test_dpo_continuing_an_adapter_starts_at_log_2_against_that_adapter(tiny_model_dir, tmp_path):
    sft = TrainJob(base_model=str(tiny_model_dir), train_file=str(write_sft(tmp_path / "sft.jsonl", GOOD)),
                   output_dir=str(tmp_path / "sft"), sbora=SBoRAConfig(r=8, alpha=16),
                   hyperparameters=Hyperparameters(max_steps=8, learning_rate=2e-2, max_seq_len=96), device="cpu")
    sft_adapter = train(sft).adapter_dir
    pairs_file = write_pairs(tmp_path / "train.jsonl", GOOD[:8], 1)
    rec = Recorder()
    # Dropout is set but off in DPO's policy: with it, a continued adapter would not start at log 2.
    result = train(dpo_job(tiny_model_dir, pairs_file, tmp_path / "dpo", init_adapter=str(sft_adapter), dropout=0.2,
                           hp={"max_steps": 2}), rec)
    assert rec.progress[0].loss == pytest.approx(math.log(2), abs=1e-5)
    assert rec.progress[0].metrics["rewards_margins"] == pytest.approx(0, abs=1e-6)
    assert rec.checkpoints == [] and result.metrics["train_rewards_margins"] is not None
    # The bare base is a different reference: taking it would not start at log 2.
    base = load_base_model(str(tiny_model_dir), device="cpu")
    pairs = tokenize_pairs(base.tokenizer, load_examples(pairs_file), 96)
    bare = reference_logps(base.model, pairs, 8, base.tokenizer.pad_token_id)
    adapter = load_adapter(sft_adapter)
    layers = inject_adapter(base.model, adapter.config)
    for name, delta in adapter.modules.items():
        layers[name].load_delta(delta)
    started = reference_logps(base.model, pairs, 8, base.tokenizer.pad_token_id)
    assert (started - bare).abs().max() > 0.1
    losses, _, _ = dpo_loss((started[:, 0], started[:, 1]), bare, 0.1)
    assert abs(float(losses.mean()) - math.log(2)) > 1e-3


def test_objective_and_data_must_match(tiny_model_dir, tmp_path):
    sft_file = write_sft(tmp_path / "sft.jsonl", GOOD)
    with pytest.raises(ConfigError, match="train_file.*preference pairs"):
        train(dpo_job(tiny_model_dir, sft_file, tmp_path / "o"))
    pairs = write_pairs(tmp_path / "p.jsonl", GOOD, 1)
    with pytest.raises(ConfigError, match="train_file.*preference"):
        train(TrainJob(base_model=str(tiny_model_dir), train_file=str(pairs), output_dir=str(tmp_path / "s"),
                       device="cpu"))
    with pytest.raises(ConfigError, match="objective"):
        TrainJob(base_model="x", train_file="t", output_dir="o", objective="dpo", resources=Resources(devices=2))


def test_preference_files_are_validated_with_line_and_field(tiny_model_dir, tmp_path):
    ok = {"input": {"messages": [{"role": "user", "content": "Hi"}]},
          "preferred_output": [{"role": "assistant", "content": "Hello!"}],
          "non_preferred_output": [{"role": "assistant", "content": "Go away."}]}
    bad = [
        ok,
        {k: v for k, v in ok.items() if k != "non_preferred_output"},
        {**ok, "non_preferred_output": ok["preferred_output"]},
        {**ok, "preferred_output": [{"role": "user", "content": "Hello!"}]},
        {**ok, "preferred_output": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "Hi", "chosen": "Hello! " * 400, "rejected": "No."},
        {"prompt": "Hi there", "chosen": "Yes.", "rejected": "No."},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in bad) + "\n")
    base = load_base_model(str(tiny_model_dir), device="cpu")
    report = validate_dataset(path, base.tokenizer, max_seq_len=1024)
    assert report.format == "preference" and not report.ok
    found = {p.line: p.message for p in report.errors}
    assert 'missing field "non_preferred_output"' in found[2]
    assert "identical" in found[3] and "preferred_output" in found[3]
    assert "preferred_output[0]" in found[4] and "assistant" in found[4]
    assert "preferred_output" in found[5] and "2 messages" in found[5]
    assert "longer than 1024" in found[6]
    assert set(found) == {2, 3, 4, 5, 6}, found
    pairs = load_examples(write_pairs(tmp_path / "ok.jsonl", GOOD[:2], 1, openai=False))
    assert [p.chosen for p in pairs] == [" sun is good.", " tea is good."] and pairs[0].prompt.startswith("Say")
