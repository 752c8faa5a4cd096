"""A job on several ranks: real torchrun processes on gloo, compared with one process.

Every run here is a real `torch.distributed.run` with two CPU ranks on the tiny model; the
reference is the same job trained in this process."""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sbora_core.method.adapter_io import load_adapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.models import load_base_model
from sbora_core.training.distributed import parameter_bytes
from sbora_core.training.job import Hyperparameters, Resources, TrainJob
from sbora_core.training.launch import LaunchSettings, RankFailure, rank_pids, train_on_ranks
from sbora_core.training.train import Callbacks, train

COLOURS = ["red", "green", "blue", "black", "white", "pink", "grey", "gold"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Item {i}: which colour?"},
                                             {"role": "assistant", "content": f"The colour is {COLOURS[i % 8]}."}]})
                    + "\n")
    return path


def make_job(model: Path, data: Path, out: Path, devices: int = 1, sharding: str = "none", quantization: str = "none",
             **hp) -> TrainJob:
    # batch 5 over 2 ranks splits 3 + 2; grad_accum 2: accumulation without a sync in between.
    settings = {"max_steps": 6, "batch_size": 5, "grad_accum": 2, "learning_rate": 1e-2, "max_seq_len": 48,
                "seed": 3, "checkpoint_every": 2, "val_fraction": 0.1, "eval_every": 3, **hp}
    return TrainJob(base_model=str(model), train_file=str(data), output_dir=str(out),
                    sbora=SBoRAConfig(variant="sbora_fa", r=4, alpha=8, dropout=0.0),
                    hyperparameters=Hyperparameters(**settings), resources=Resources(devices=devices, sharding=sharding),
                    quantization=quantization, device="cpu")


class Recorder(Callbacks):
    def __init__(self, cancel_at_checkpoint: bool = False, on_checkpoint=None) -> None:
        self.steps: list[int] = []
        self.checkpoints: list[int] = []
        self.logs: list[str] = []
        self.evals: list[int] = []
        self.cancel_at_checkpoint = cancel_at_checkpoint
        self.checkpoint_hook = on_checkpoint

    def on_progress(self, progress) -> None:
        self.steps.append(progress.step)

    def on_eval(self, step, metrics) -> None:
        self.evals.append(step)

    def on_checkpoint(self, step, path, metrics=None) -> None:
        self.checkpoints.append(step)
        if self.checkpoint_hook:
            self.checkpoint_hook(step, path)

    def on_log(self, message) -> None:
        self.logs.append(message)

    def should_cancel(self) -> bool:
        return self.cancel_at_checkpoint and bool(self.checkpoints)


def factors(adapter_dir) -> dict[str, torch.Tensor]:
    adapter = load_adapter(adapter_dir)
    return {f"{n}.{k}": t for n, d in adapter.modules.items() for k, t in d.factors().items()}


def assert_same_adapter(got_dir, want_dir, rtol=1e-5) -> None:
    got, want = factors(got_dir), factors(want_dir)
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert expected.abs().max() > 0, f"{name} never trained: the comparison would prove nothing"
        error = float((got[name] - expected).abs().max() / expected.abs().max())
        assert error < rtol, f"{name}: relative difference {error:.2e}"


def on_ranks(job: TrainJob, run_dir: Path, callbacks: Callbacks | None = None):
    return train_on_ranks(job, callbacks or Recorder(), run_dir, LaunchSettings(devices=job.resources.devices,
                                                                                step_timeout_s=30))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    """The job trained in this process: what every world size must reproduce."""
    result = train(make_job(tiny_model_dir, data, tmp_path_factory.mktemp("one")), Recorder())
    return result.adapter_dir


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_full_sharding_gives_the_same_adapter_and_halves_the_base_per_rank(tiny_model_dir, data, tmp_path, reference,
                                                                          quantization):
    no_validation = {"val_fraction": 0.0, "eval_every": None}
    if quantization == "none":
        want = reference
    else:  # NF4: bitsandbytes' eval mode repacks CPU weights, so compare runs without validation
        # One process loads the base as the sharded ranks do (bf16-stored, double-quantised NF4).
        want = train(make_job(tiny_model_dir, data, tmp_path / "one", sharding="full", quantization="nf4",
                              **no_validation), Recorder()).adapter_dir
    # Gradient checkpointing recomputes each sharded layer's forward (gathered again) in the backward: same adapter.
    job = make_job(tiny_model_dir, data, tmp_path / "out", devices=2, sharding="full", quantization=quantization,
                   gradient_checkpointing=True, **({} if quantization == "none" else no_validation))
    result = on_ranks(job, tmp_path / "run")
    assert result is not None and result.status == "succeeded"
    assert_same_adapter(result.adapter_dir, want)

    whole = load_base_model(str(tiny_model_dir), quantization=quantization, device="cpu", shardable=True)
    frozen = sum(parameter_bytes(whole.model).values())  # nothing is frozen before an adapter is injected
    ends = [json.loads(p.read_text()) for p in sorted((tmp_path / "run" / "ranks").glob("*.json"))]
    held = [end["parameter_bytes"]["frozen"] for end in ends]
    assert len(held) == 2 and all(abs(h - frozen / 2) <= 0.02 * frozen for h in held), (held, frozen)


def test_two_ranks_train_the_one_process_adapter_and_resume_on_either_world_size(tiny_model_dir, data, tmp_path,
                                                                                 reference):
    """2 ranks vs 1 at every step: 2 ranks -> 1 process, and 1 process -> 2 ranks, each ends with the
    one-process adapter (gradients averaged instead of summed over the ranks fail it at 9e-4)."""
    # 2 ranks -> 1: the two ranks stop after their first checkpoint, one process finishes.
    out = tmp_path / "two-then-one"
    job = make_job(tiny_model_dir, data, out, devices=2, checkpoint_every=1)  # the same run, more checkpoints
    stopped = on_ranks(job, tmp_path / "run-a", Recorder(True))
    assert stopped is not None and stopped.status == "cancelled" and stopped.metrics["steps"] < 6
    resumed = Recorder()
    finished = train(make_job(tiny_model_dir, data, out), resumed)
    assert any(m.startswith("resumed from step-") for m in resumed.logs)
    assert_same_adapter(finished.adapter_dir, reference)

    # 1 -> 2 ranks: steps 3 to 6 on two ranks (batch 5 split 3 + 2, two micro-batches, validation at 3 and 6).
    out = tmp_path / "one-then-two"
    assert train(make_job(tiny_model_dir, data, out), Recorder(True)).status == "cancelled"
    recorder = Recorder()
    result = on_ranks(make_job(tiny_model_dir, data, out, devices=2), tmp_path / "run-b", recorder)
    assert result is not None and result.status == "succeeded"
    assert_same_adapter(result.adapter_dir, reference)
    assert recorder.steps == [3, 4, 5, 6] and recorder.checkpoints == [4, 6] and recorder.evals == [3, 6]
    assert any("2 ranks, sharding none" in m for m in recorder.logs), recorder.logs
    # Rank 0 alone wrote checkpoints, whole: each loads as an ordinary adapter.
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-0000004", "step-0000006"]
    assert factors(checkpoints[-1]).keys() == factors(reference).keys()
    assert load_adapter(result.adapter_dir).metadata["resources"] == {"devices": 2, "nodes": 1, "sharding": "none"}
    assert rank_pids(tmp_path / "run-b") == []


def test_a_rank_killed_stops_every_rank_within_seconds(tiny_model_dir, data, tmp_path):
    run_dir = tmp_path / "run"
    killed: dict[str, float] = {}

    def kill_rank_1(step, path) -> None:
        if not killed:
            os.kill(int((run_dir / "ranks" / "1.pid").read_text()), signal.SIGKILL)
            killed["at"] = time.monotonic()

    job = make_job(tiny_model_dir, data, tmp_path / "out", devices=2, max_steps=200, checkpoint_every=1)
    with pytest.raises(RankFailure) as failure:
        on_ranks(job, run_dir, Recorder(on_checkpoint=kill_rank_1))
    assert time.monotonic() - killed["at"] < 10, "the surviving rank must not wait for a collective timeout"
    assert failure.value.kind == "died" and failure.value.rank == 1, failure.value
    assert rank_pids(run_dir) == []


def test_a_job_file_takes_resources_and_names_a_bad_field():
    job = TrainJob.from_dict({"base_model": "m", "train_file": "t", "output_dir": "o",
                              "resources": {"devices": 2, "sharding": "full"}})
    assert job.resources == Resources(devices=2, nodes=1, sharding="full") and job.resources.world_size == 2
    assert replace(job, resources=Resources()).to_dict()["resources"] == {"devices": 1, "nodes": 1, "sharding": "none"}
    for resources, field in (({"devices": 0}, "resources.devices"), ({"sharding": "half"}, "resources.sharding"),
                             ({"gpus": 2}, "resources.gpus")):
        with pytest.raises(ValueError, match=field):
            TrainJob.from_dict({"base_model": "m", "train_file": "t", "output_dir": "o", "resources": resources})
