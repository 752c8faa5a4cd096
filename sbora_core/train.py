"""The training loop: one fine-tuning job from dataset to adapter.

`train(job, callbacks)` loads the base model (optionally 4-bit or 8-bit),
injects the adapter, and runs AdamW with a warmup + cosine/linear/constant
schedule and gradient accumulation. It reports through `Callbacks` (progress,
evaluation, checkpoints, log lines) and polls `should_cancel` once per
optimiser step. Checkpoints hold everything needed to resume exactly: factors,
optimiser and scheduler state, RNG states and the data position, so a resumed
run ends with the same adapter as an uninterrupted one.

Deterministic given the seed: the data order of epoch e is a permutation drawn
from (seed, e), and dropout draws from the global generator saved in checkpoints.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sbora_core.adapter_io import load_adapter, save_adapter
from sbora_core.config import SBoRAConfig
from sbora_core.data import (
    IGNORE_INDEX,
    TokenizedExample,
    collate,
    load_examples,
    tokenize_examples,
)
from sbora_core.evaluate import validation_loss
from sbora_core.inject import (
    adapter_from_model,
    adapter_layers,
    inject_adapter,
    trainable_parameters,
)
from sbora_core.models import QUANTIZATIONS, load_base_model

SCHEDULES = ("cosine", "linear", "constant")
STATE_FILE = "trainer_state.pt"


@dataclass
class Hyperparameters:
    epochs: int = field(default=1, metadata={"help": "passes over the training data (ignored when max_steps is set)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimiser steps to run; overrides epochs"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate of AdamW"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps (or use warmup_ratio)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "warmup as a fraction of all steps"})
    schedule: str = field(default="cosine", metadata={"help": "cosine, linear or constant decay after warmup"})
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    max_seq_len: int = field(default=512, metadata={"help": "tokens per example; longer ones are truncated"})
    seed: int = field(default=0, metadata={"help": "seed for data order, dropout and the validation split"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping; null to disable"})
    eval_every: int | None = field(default=None, metadata={"help": "steps between validation runs"})
    checkpoint_every: int | None = field(default=None, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    val_fraction: float = field(default=0.0, metadata={"help": "fraction of the training file held out for validation"})
    eval_batch_size: int = field(default=8, metadata={"help": "examples per validation batch"})

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("max_steps", self.max_steps, allow_none=True)
        positive_int("batch_size", self.batch_size)
        positive_int("grad_accum", self.grad_accum)
        positive_int("max_seq_len", self.max_seq_len)
        positive_int("eval_every", self.eval_every, allow_none=True)
        positive_int("checkpoint_every", self.checkpoint_every, allow_none=True)
        positive_int("keep_checkpoints", self.keep_checkpoints)
        positive_int("eval_batch_size", self.eval_batch_size)
        if not isinstance(self.learning_rate, int | float) or not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate: must be in (0, 1), got {self.learning_rate!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be a non-negative integer, got {self.warmup_steps!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm: must be positive or null, got {self.max_grad_norm!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {self.seed!r}")


@dataclass
class TrainJob:
    base_model: str
    train_file: str
    output_dir: str
    sbora: SBoRAConfig = field(default_factory=SBoRAConfig)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    quantization: str = "none"
    val_file: str | None = None
    device: str | None = None  # default: cuda when present, else cpu

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJob:
        """From the layout of a job file (YAML/JSON): method and hyperparameters as sub-mappings."""
        data = dict(data)
        unknown = set(data) - set(cls.__dataclass_fields__) - {"method"}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown job field; known: {', '.join(sorted(cls.__dataclass_fields__))}")
        method = data.pop("method", None) or data.pop("sbora", None) or {}
        hp = data.pop("hyperparameters", None) or {}
        for name, section, known in (("method", method, SBoRAConfig), ("hyperparameters", hp, Hyperparameters)):
            extra = set(section) - set(known.__dataclass_fields__)
            if extra:
                raise ValueError(f"{name}.{sorted(extra)[0]}: unknown field")
        return cls(sbora=SBoRAConfig(**method), hyperparameters=Hyperparameters(**hp), **data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["method"] = data.pop("sbora")
        return data


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: float  # fractional: 1.5 = halfway through the second epoch
    loss: float
    learning_rate: float
    tokens: int  # tokens processed so far (padding excluded)
    tokens_per_s: float
    elapsed_s: float
    eta_s: float


class Callbacks:
    """Override what you need; every hook defaults to doing nothing."""

    def on_progress(self, progress: Progress) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path) -> None: ...

    def on_log(self, message: str) -> None: ...

    def should_cancel(self) -> bool:
        return False


@dataclass
class TrainResult:
    status: str  # "succeeded" or "cancelled"
    adapter_dir: Path | None
    metrics: dict[str, Any]
    last_checkpoint: Path | None


# -- schedule and batches ----------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier on the peak learning rate at `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    val = {i for i in order[:n_val]}
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


@dataclass
class Position:
    """Where the run is: completed optimiser steps and the next micro-batch of the data."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # next micro-batch index within the epoch
    tokens: int = 0


def micro_batches(examples: list[TokenizedExample], hp: Hyperparameters, pos: Position) -> Iterator[list[TokenizedExample]]:
    """Endless micro-batches from `pos`, advancing `pos.epoch` / `pos.batch` as it goes."""
    n_batches = math.ceil(len(examples) / hp.batch_size)
    while True:
        order = epoch_order(len(examples), hp.seed, pos.epoch)
        while pos.batch < n_batches:
            chunk = order[pos.batch * hp.batch_size : (pos.batch + 1) * hp.batch_size]
            pos.batch += 1
            yield [examples[i] for i in chunk]
        pos.epoch += 1
        pos.batch = 0


# -- checkpoints -------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(output_dir: Path, model, config: SBoRAConfig, optimizer, scheduler,
                     pos: Position, history: dict[str, Any], keep: int) -> Path:
    root = output_dir / "checkpoints"
    final = root / f"step-{pos.step:07d}"
    tmp = root / f".tmp-step-{pos.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(adapter_from_model(model, config), tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "position": asdict(pos),
            "history": history,
        },
        tmp / STATE_FILE,
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint directory either exists whole or not at all
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[Position, dict[str, Any]]:
    adapter = load_adapter(path)
    layers = dict(adapter_layers(model))
    for name, delta in adapter.modules.items():
        if name not in layers:
            raise ValueError(f"checkpoint {path.name}: layer {name} is not part of this job's adapter")
        layers[name].load_delta(delta)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return Position(**state["position"]), state["history"]


# -- the loop ----------------------------------------------------------------------------------
def _make_optimizer(params: list[torch.nn.Parameter], hp: Hyperparameters, device: torch.device):
    kwargs: dict[str, Any] = {"lr": hp.learning_rate, "weight_decay": hp.weight_decay}
    if device.type in ("cpu", "cuda"):
        kwargs["fused"] = True  # one kernel for all factors instead of a Python loop per tensor
    return torch.optim.AdamW(params, **kwargs)


def _token_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropy over target tokens (labels != -100)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = batch["labels"][:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def train(job: TrainJob, callbacks: Callbacks | None = None, *, resume: bool = True) -> TrainResult:
    """Run `job` to completion or cancellation; resumes from its latest checkpoint if any."""
    cb = callbacks or Callbacks()
    hp = job.hyperparameters
    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(hp.seed)
    random.seed(hp.seed)

    # Data first: a bad file fails before any model is loaded.
    train_examples = load_examples(job.train_file)
    val_examples = load_examples(job.val_file) if job.val_file else []
    if not val_examples and hp.val_fraction > 0:
        train_examples, val_examples = split_validation(train_examples, hp.val_fraction, hp.seed)

    base = load_base_model(job.base_model, quantization=job.quantization, device=job.device)
    device = base.device
    model, tokenizer = base.model, base.tokenizer
    train_tok = tokenize_examples(tokenizer, train_examples, hp.max_seq_len)
    val_tok = tokenize_examples(tokenizer, val_examples, hp.max_seq_len)
    if not train_tok:
        raise ValueError("train_file: no example has a completion left after truncation; raise max_seq_len")
    cb.on_log(f"loaded {base.name} ({job.quantization}) on {device}; "
              f"{len(train_tok)} training and {len(val_tok)} validation examples")

    config = SBoRAConfig.from_dict({**job.sbora.to_dict(), "base_model": base.fingerprint})
    inject_adapter(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, hp, device)
    steps_per_epoch = math.ceil(math.ceil(len(train_tok) / hp.batch_size) / hp.grad_accum)
    total_steps = hp.max_steps or hp.epochs * steps_per_epoch
    warmup = hp.warmup_steps or int(hp.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, hp.schedule)
    )
    pos, history = Position(), {"train_loss": [], "val_loss": [], "elapsed_s": 0.0}
    checkpoints = checkpoint_dirs(output_dir)
    if resume and checkpoints:
        pos, history = _load_checkpoint(checkpoints[-1], model, optimizer, scheduler)
        cb.on_log(f"resumed from {checkpoints[-1].name} (step {pos.step} of {total_steps})")

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and torch.cuda.is_bf16_supported()
        else torch.autocast(device.type, enabled=False)
    )
    batches = micro_batches(train_tok, hp, pos)
    run_start, run_start_step = time.perf_counter(), pos.step
    elapsed_before = history["elapsed_s"]
    last_checkpoint = checkpoints[-1] if checkpoints and resume else None
    pad_id = tokenizer.pad_token_id
    status = "succeeded"
    model.train()

    def evaluate_now() -> float:
        loss = validation_loss(model, val_tok, hp.eval_batch_size, pad_id)
        model.train()
        history["val_loss"].append([pos.step, loss])
        cb.on_eval(pos.step, {"val_loss": loss})
        return loss

    def checkpoint_now() -> Path:
        history["elapsed_s"] = elapsed_before + time.perf_counter() - run_start
        path = _save_checkpoint(output_dir, model, config, optimizer, scheduler, pos, history, hp.keep_checkpoints)
        cb.on_checkpoint(pos.step, path)
        return path

    while pos.step < total_steps:
        if cb.should_cancel():
            status = "cancelled"
            break
        micro = [collate(next(batches), pad_id) for _ in range(hp.grad_accum)]
        step_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for batch in micro:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                loss = _token_loss_sum(model, batch) / max(1, step_targets)
            loss.backward()
            loss_sum += loss.item()
            pos.tokens += int(batch["attention_mask"].sum())
        if hp.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"training diverged at step {pos.step + 1} (loss {loss_sum}); lower learning_rate"
            )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        pos.step += 1
        history["train_loss"].append([pos.step, loss_sum])

        run_elapsed = time.perf_counter() - run_start
        done_this_run = pos.step - run_start_step
        cb.on_progress(Progress(
            step=pos.step,
            total_steps=total_steps,
            epoch=pos.epoch + pos.batch / max(1, math.ceil(len(train_tok) / hp.batch_size)),
            loss=loss_sum,
            learning_rate=lr,
            tokens=pos.tokens,
            tokens_per_s=pos.tokens / max(1e-9, elapsed_before + run_elapsed),
            elapsed_s=elapsed_before + run_elapsed,
            eta_s=run_elapsed / done_this_run * (total_steps - pos.step),
        ))
        if val_tok and hp.eval_every and pos.step % hp.eval_every == 0:
            evaluate_now()
        if hp.checkpoint_every and pos.step % hp.checkpoint_every == 0:
            last_checkpoint = checkpoint_now()

    if status == "cancelled":
        # Keep the work done so far: a cancelled run can be resumed from here.
        if pos.step and (last_checkpoint is None or not last_checkpoint.name.endswith(f"{pos.step:07d}")):
            last_checkpoint = checkpoint_now()
        cb.on_log(f"cancelled after step {pos.step} of {total_steps}")
        return TrainResult("cancelled", None, {"steps": pos.step, "total_steps": total_steps}, last_checkpoint)

    evaluated_last_step = bool(history["val_loss"]) and history["val_loss"][-1][0] == pos.step
    val_loss = (history["val_loss"][-1][1] if evaluated_last_step else evaluate_now()) if val_tok else None
    recent = [loss for _, loss in history["train_loss"][-10:]]
    metrics = {
        "train_loss": sum(recent) / len(recent) if recent else None,
        "val_loss": val_loss,
        "steps": pos.step,
        "epochs": pos.step / steps_per_epoch,
        "tokens": pos.tokens,
        "wall_time_s": elapsed_before + time.perf_counter() - run_start,
        "trainable_params": trainable_parameters(model),
        "train_examples": len(train_tok),
        "val_examples": len(val_tok),
        "loss_curve": history["train_loss"],
        "val_curve": history["val_loss"],
    }
    metadata = {
        "base_model_name": base.name,
        "quantization": job.quantization,
        "hyperparameters": asdict(hp),
        "metrics": {k: v for k, v in metrics.items() if k not in ("loss_curve", "val_curve")},
        "device": str(device),
        "total_time_s": time.perf_counter() - started,
    }
    adapter_dir = save_adapter(adapter_from_model(model, config, metadata), output_dir / "adapter")
    cb.on_log(f"finished {pos.step} steps; adapter written to {adapter_dir}")
    return TrainResult("succeeded", adapter_dir, metrics, last_checkpoint)
