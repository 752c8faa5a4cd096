"""The training loop: one fine-tuning job from dataset to adapter.

`train(job, callbacks)` runs three phases:
- `prepare`: read the data (a bad file fails before any model loads), load
  the base model (optionally 4-bit or 8-bit), inject the adapter, build AdamW
  with a warmup + cosine/linear/constant schedule, and resume from the latest
  checkpoint if there is one;
- `Run.step`: one optimiser step over `grad_accum` micro-batches;
- `Run.finish`: the final validation, metrics and the adapter files.
It reports through `Callbacks` (progress, evaluation, checkpoints, log lines)
and polls `should_cancel` once per optimiser step. Checkpoints
(`checkpoint.py`) hold everything needed to resume exactly, so a resumed run
ends with the same adapter as an uninterrupted one.

Deterministic given the seed: the data order of epoch e is a permutation drawn
from (seed, e), and dropout draws from the global generator saved in checkpoints.
"""

from __future__ import annotations

import math
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sbora_core.method.adapter_io import save_adapter
from sbora_core.method.config import ConfigError, SBoRAConfig
from sbora_core.method.inject import adapter_from_model, inject_adapter, trainable_parameters
from sbora_core.method.layers import follow_optimizer
from sbora_core.method.models import BaseModel, load_base_model
from sbora_core.training import distributed
from sbora_core.training.checkpoint import (
    History,
    Position,
    checkpoint_dirs,
    load_checkpoint,
    load_factors,
    save_checkpoint,
)
from sbora_core.training.distributed import Ranks
from sbora_core.training.job import Hyperparameters, TrainJob
from sbora_core.training.loss import token_loss_sum
from sbora_core.training.objectives import DPO, SFT, backward_pass, objective_for, records_for
from sbora_core.training.preference import tokenize_pairs
from sbora_core.training.tokenization import pack_examples, tokenize_examples

__all__ = ["Callbacks", "Progress", "Run", "TrainResult", "autocast_for", "backward_pass", "prepare", "train"]


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
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's (token accuracy; DPO's rewards)


class Callbacks:
    """Override what you need; every hook defaults to doing nothing."""

    def on_progress(self, progress: Progress) -> None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any] | None = None) -> None:
        """A checkpoint was written; `metrics` are checkpoint_metrics' (step, train_*, valid_*)."""

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
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def micro_batches(examples: list[Any], hp: Hyperparameters, pos: Position) -> Iterator[list[Any]]:
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


def _make_optimizer(params: list[torch.nn.Parameter], hp: Hyperparameters, device: torch.device):
    kwargs: dict[str, Any] = {"lr": hp.learning_rate, "weight_decay": hp.weight_decay}
    if device.type in ("cpu", "cuda"):
        kwargs["fused"] = True  # one kernel for all factors instead of a Python loop per tensor
    return torch.optim.AdamW(params, **kwargs)


def autocast_for(device: torch.device) -> Any:
    """bf16 autocast on a GPU that has bf16 (factors stay fp32, their matmuls run in bf16); off elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def device_name(device: torch.device) -> str:
    """What a run ran on, for the adapter's metadata: the GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


# -- a run -------------------------------------------------------------------------------------
@dataclass
class Run:
    """A prepared run: the model with its adapter, the data, the optimiser, and where it stands."""

    job: TrainJob
    callbacks: Callbacks
    base: BaseModel
    config: SBoRAConfig  # the job's adapter config with the base model's fingerprint
    train_examples: list[Any]  # TokenizedExamples (SFT) or TokenizedPairs (DPO)
    val_examples: list[Any]
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    total_steps: int
    steps_per_epoch: int
    pos: Position = field(default_factory=Position)
    history: History = field(default_factory=History)
    last_checkpoint: Path | None = None
    started: float = field(default_factory=time.perf_counter)  # when this process began the job
    run_start: float = 0.0  # when this process began stepping
    run_start_step: int = 0
    elapsed_before: float = 0.0  # training time of earlier processes (from the checkpoint)
    ranks: Ranks | None = None  # this process's rank when the job runs on several
    loss_module: Any = None  # with ranks: the data-parallel module the loss runs through
    objective: SFT | DPO = field(default_factory=SFT)

    def __post_init__(self) -> None:
        self.hp = self.job.hyperparameters
        self.output_dir = Path(self.job.output_dir)
        self.model = self.base.model
        self.pad_id = self.base.tokenizer.pad_token_id
        self.batches = micro_batches(self.train_examples, self.hp, self.pos)
        self.batches_per_epoch = max(1, math.ceil(len(self.train_examples) / self.hp.batch_size))
        self.autocast = autocast_for(self.base.device)

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.run_start

    def start(self) -> None:
        self.run_start, self.run_start_step = time.perf_counter(), self.pos.step
        self.elapsed_before = self.history.elapsed_s
        self.model.train()

    def step(self) -> float:
        """One optimiser step; the step's mean loss per target token."""
        hp = self.hp
        batches = [next(self.batches) for _ in range(hp.grad_accum)]  # on several ranks: every rank's
        share = self.ranks.step(batches, self.loss_module, hp.seed, self.pos.step) if self.ranks else None
        self.optimizer.zero_grad(set_to_none=True)
        loss, tokens, extras = self.objective.step(self.model, share.parts if share else batches, self.pad_id,
                                                   self.autocast, self.base.device, share)
        self.pos.tokens += share.step_tokens if share else tokens
        if hp.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, hp.max_grad_norm)
        values = torch.cat([loss[None], extras.to(loss.dtype)])
        # The step's one read back from the device (summed over the ranks' parts first).
        loss_sum, *step_metrics = (self.ranks.total(values) if self.ranks else values).tolist()
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"training diverged at step {self.pos.step + 1} (loss {loss_sum}); lower learning_rate")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.pos.step += 1
        self.history.train_loss.append([self.pos.step, loss_sum])
        for name, value in zip(self.objective.metric_names, step_metrics, strict=True):
            self.history.curve("train", name).append([self.pos.step, value])
        self._report(loss_sum, lr, dict(zip(self.objective.metric_names, step_metrics, strict=True)))
        return loss_sum

    def _report(self, loss: float, lr: float, metrics: dict[str, float]) -> None:
        run_elapsed = time.perf_counter() - self.run_start
        pos = self.pos
        self.callbacks.on_progress(Progress(
            step=pos.step, total_steps=self.total_steps, epoch=pos.epoch + pos.batch / self.batches_per_epoch,
            loss=loss, learning_rate=lr, tokens=pos.tokens,
            tokens_per_s=pos.tokens / max(1e-9, self.elapsed_s), elapsed_s=self.elapsed_s,
            eta_s=run_elapsed / (pos.step - self.run_start_step) * (self.total_steps - pos.step), metrics=metrics,
        ))

    def validation(self, examples: list[Any]) -> dict[str, float]:
        """Loss and the objective's metrics on `examples`; collective on several ranks (a sharded
        base's layers are gathered by every rank together), back in training mode after."""
        if self.ranks:
            metrics = distributed.validation_metrics(self.loss_module.module, self.model, examples,
                                                     self.hp.eval_batch_size, self.pad_id, self.ranks)
        else:
            metrics = self.objective.validation(self.model, examples, self.hp.eval_batch_size, self.pad_id)
        self.model.train()
        return metrics

    def evaluate(self) -> float:
        """Validation on the whole validation set (spread over the ranks on several); the loss."""
        metrics = self.validation(self.val_examples)
        self.model.train()
        self.history.val_loss.append([self.pos.step, metrics["loss"]])
        for name in self.objective.metric_names:
            self.history.curve("val", name).append([self.pos.step, metrics[name]])
        self.callbacks.on_eval(self.pos.step, {"val_loss": metrics["loss"],
                                               **{f"val_{n}": metrics[n] for n in self.objective.metric_names}})
        return metrics["loss"]

    def checkpoint_metrics(self) -> dict[str, Any]:
        """What a checkpoint records, as OpenAI's fine-tuning names it: the step's training loss and
        objective metrics (token accuracy; DPO's rewards), and the same on one validation batch (the
        batches taken in turn, checkpoint after checkpoint)."""
        step = self.pos.step
        metrics: dict[str, Any] = {"step": step}
        names = self.objective.metric_names
        for name, curve in [("loss", self.history.train_loss),
                            *((n, self.history.curve("train", n)) for n in names)]:
            if curve and curve[-1][0] == step:
                metrics[f"train_{name}"] = curve[-1][1]
        if self.val_examples:
            size = self.hp.eval_batch_size
            batches = math.ceil(len(self.val_examples) / size)
            turn = (step // (self.hp.checkpoint_every or step or 1)) % batches
            valid = self.validation(self.val_examples[turn * size:(turn + 1) * size])
            metrics.update({f"valid_{n}": valid[n] for n in ("loss", *names)})
        return metrics

    def checkpoint(self) -> Path | None:
        """Rank 0 writes (factors and optimiser state are whole on every rank); the others go on."""
        metrics = self.checkpoint_metrics()  # on every rank: validation is collective there
        if self.ranks and not self.ranks.is_writer:
            return None
        self.history.elapsed_s = self.elapsed_s
        path = save_checkpoint(self.output_dir, self.model, self.config, self.optimizer, self.scheduler,
                               self.pos, self.history, self.hp.keep_checkpoints, self.objective)
        self.last_checkpoint = path
        self.callbacks.on_checkpoint(self.pos.step, path, metrics)
        return path

    def after_step(self) -> None:
        """Validation and checkpoints that fall on this step."""
        hp, step = self.hp, self.pos.step
        if self.val_examples and hp.eval_every and step % hp.eval_every == 0:
            self.evaluate()
        if hp.checkpoint_every and step % hp.checkpoint_every == 0:
            self.checkpoint()

    def cancel(self) -> TrainResult:
        """Keep the work done so far (a cancelled run can be resumed from here)."""
        if self.pos.step and (self.last_checkpoint is None
                              or not self.last_checkpoint.name.endswith(f"{self.pos.step:07d}")):
            self.checkpoint()
        self.callbacks.on_log(f"cancelled after step {self.pos.step} of {self.total_steps}")
        return TrainResult("cancelled", None, {"steps": self.pos.step, "total_steps": self.total_steps},
                           self.last_checkpoint)

    def finish(self) -> TrainResult:
        """The final validation (unless the last step had one), the metrics and the adapter files."""
        val_loss, names = None, self.objective.metric_names
        if self.val_examples:
            if not self.history.evaluated_at(self.pos.step):
                self.evaluate()
            val_loss = self.history.val_loss[-1][1]
        metrics: dict[str, Any] = {
            "objective": self.objective.name,
            "train_loss": self.history.recent_train_loss(),
            **{f"train_{n}": self.history.recent(self.history.curve("train", n)) for n in names},
            "val_loss": val_loss,
            # The whole validation set at the end, as OpenAI's final checkpoint names it.
            "full_valid_loss": val_loss,
            **{f"full_valid_{n}": self.history.curve("val", n)[-1][1] if val_loss is not None else None
               for n in names},
            "steps": self.pos.step,
            "epochs": self.pos.step / self.steps_per_epoch,
            "tokens": self.pos.tokens,
            "wall_time_s": self.elapsed_s,
            "trainable_params": trainable_parameters(self.model),
            "train_examples": len(self.train_examples),  # pairs for DPO
            "val_examples": len(self.val_examples),
            "loss_curve": self.history.train_loss,
            "val_curve": self.history.val_loss,
        }
        if self.ranks:  # what one rank holds: 1/N of the frozen base when it is sharded
            metrics["rank_parameter_bytes"] = distributed.parameter_bytes(self.model)
        metadata = {
            "base_model_name": self.base.name,
            "quantization": self.job.quantization,
            "hyperparameters": asdict(self.hp),
            "objective": {"type": self.job.objective, "beta": self.job.beta, "loss": self.job.loss}
            if self.job.objective == "dpo" else {"type": "sft"},
            "metrics": {k: v for k, v in metrics.items() if k not in ("loss_curve", "val_curve")},
            "device": str(self.base.device),
            "device_name": device_name(self.base.device),
            "total_time_s": time.perf_counter() - self.started,
        }
        if self.ranks:
            metadata["resources"] = asdict(self.job.resources)
            if not self.ranks.is_writer:
                return TrainResult("succeeded", None, metrics, self.last_checkpoint)
        adapter_dir = save_adapter(adapter_from_model(self.model, self.config, metadata),
                                   self.output_dir / "adapter")
        self.callbacks.on_log(f"finished {self.pos.step} steps; adapter written")
        return TrainResult("succeeded", adapter_dir, metrics, self.last_checkpoint)


def prepare(job: TrainJob, callbacks: Callbacks | None = None, *, resume: bool = True,
            ranks: Ranks | None = None, step_timeout_s: float = 60.0) -> Run:
    """Load data and model, inject the adapter, build the optimiser; resume from the latest checkpoint.
    With `ranks` (joined, `distributed.join_ranks`) the model is wrapped for data-parallel training."""
    cb = callbacks or Callbacks()
    hp = job.hyperparameters
    started = time.perf_counter()
    output_dir = Path(job.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(hp.seed)
    random.seed(hp.seed)

    # Data first: a bad file fails before any model is loaded.
    train_records = records_for(job.objective, "train_file", job.train_file)
    val_records = records_for(job.objective, "val_file", job.val_file) if job.val_file else []
    if not val_records and hp.val_fraction > 0:
        train_records, val_records = split_validation(train_records, hp.val_fraction, hp.seed)

    base = load_base_model(job.base_model, quantization=job.quantization,
                           device=ranks.device if ranks else job.device,
                           shardable=job.resources.sharding == "full")
    tokenize = tokenize_pairs if job.objective == "dpo" else tokenize_examples
    train_examples: list[Any] = tokenize(base.tokenizer, train_records, hp.max_seq_len)
    val_examples: list[Any] = tokenize(base.tokenizer, val_records, hp.max_seq_len)
    if not train_examples:
        raise ConfigError("train_file", "no example has a completion left after truncation; raise max_seq_len")
    packed = ""
    if hp.packing:
        rows = pack_examples(train_examples, hp.max_seq_len)
        packed = f" ({len(train_examples)} packed into {len(rows)} rows)"
        train_examples = rows
    weights = next(base.model.parameters()).dtype
    cb.on_log(f"loaded {base.name} ({job.quantization}, {str(weights).removeprefix('torch.')}) on "
              f"{device_name(base.device)}; {len(train_examples)} training{packed} and {len(val_examples)} "
              "validation examples")

    config = SBoRAConfig.from_dict({**job.sbora.to_dict(), "base_fingerprint": base.fingerprint})
    layers = list(inject_adapter(base.model, config).values())
    if job.init_adapter:
        load_factors(base.model, Path(job.init_adapter))
        cb.on_log("started from the given adapter's index sets and factors")
    if hp.gradient_checkpointing:
        # Non-reentrant: works with a frozen base (no input needs grad) and replays dropout exactly.
        checkpointing = {"use_reentrant": False}
        if hasattr(base.model, "activation_checkpointing_enable"):  # the name in newer transformers
            base.model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
        else:
            base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    params = [p for p in base.model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, hp, base.device)
    follow_optimizer(optimizer, layers)
    steps_per_epoch = math.ceil(math.ceil(len(train_examples) / hp.batch_size) / hp.grad_accum)
    total_steps = hp.max_steps or hp.epochs * steps_per_epoch
    warmup = hp.warmup_steps or int(hp.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, hp.schedule))
    pos, history, last_checkpoint = Position(), History(), None
    objective = objective_for(job.objective, job.beta, job.loss)
    checkpoints = checkpoint_dirs(output_dir)
    if resume and checkpoints:
        last_checkpoint = checkpoints[-1]
        pos, history = load_checkpoint(last_checkpoint, base.model, optimizer, scheduler, objective)
        cb.on_log(f"resumed from {last_checkpoint.name} (step {pos.step} of {total_steps})")
    # DPO's reference pass: the model as the job starts (before any step); a resume brought it back.
    if note := objective.prepare(base.model, [train_examples, val_examples], hp.eval_batch_size,
                                 base.tokenizer.pad_token_id):
        cb.on_log(note)
    loss_module = None
    if ranks:
        distributed.open_training_group(ranks, step_timeout_s)
        ranks.check_same_step(pos.step)
        loss_module = distributed.data_parallel(base.model, token_loss_sum, ranks, params)
        cb.on_log(f"{ranks.world_size} ranks, sharding {ranks.sharding}; rank 0 holds "
                  + ", ".join(f"{v / 2**20:.1f} MiB {k}" for k, v in distributed.parameter_bytes(base.model).items()))
    return Run(job=job, callbacks=cb, base=base, config=config, train_examples=train_examples,
               val_examples=val_examples, optimizer=optimizer, scheduler=scheduler, params=params,
               total_steps=total_steps, steps_per_epoch=steps_per_epoch, pos=pos, history=history,
               last_checkpoint=last_checkpoint, started=started, ranks=ranks, loss_module=loss_module,
               objective=objective)


def train(job: TrainJob, callbacks: Callbacks | None = None, *, resume: bool = True,
          ranks: Ranks | None = None, step_timeout_s: float = 60.0) -> TrainResult:
    """Run `job` to completion or cancellation; resumes from its latest checkpoint if any. On
    several ranks every rank calls this; rank 0's callbacks decide a cancel for all."""
    run = prepare(job, callbacks, resume=resume, ranks=ranks, step_timeout_s=step_timeout_s)
    run.start()
    while run.pos.step < run.total_steps:
        cancel = run.callbacks.should_cancel()
        if ranks.decided_by_writer(cancel) if ranks else cancel:
            return run.cancel()
        run.step()
        run.after_step()
    return run.finish()
