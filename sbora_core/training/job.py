"""A fine-tuning job's specification: Hyperparameters and TrainJob.

With `SBoRAConfig` these are the single source of a job's settings and their
defaults (`sbora train` job files, `POST /jobs` and the OpenAI mapping all
derive from them). Every error is a `ConfigError` naming the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sbora_core.method.config import ConfigError, SBoRAConfig, is_int, is_number
from sbora_core.method.models import QUANTIZATIONS

SCHEDULES = ("cosine", "linear", "constant")
SHARDINGS = ("none", "full")
OBJECTIVES = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "ipo")
DPO_BETA = 0.1  # TRL's and OpenAI's default


@dataclass
class Hyperparameters:
    epochs: int = field(default=1, metadata={"help": "passes over the training data (ignored when max_steps is set)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimiser steps to run; overrides epochs"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate of AdamW"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps (or use warmup_ratio)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "warmup as a fraction of all steps"})
    schedule: str = field(default="cosine", metadata={"help": "cosine, linear or constant decay after warmup"})
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    max_seq_len: int = field(default=512, metadata={"help": "tokens per example; longer ones are truncated"})
    seed: int = field(default=0, metadata={"help": "seed for data order, dropout and the validation split"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping; null to disable"})
    eval_every: int | None = field(default=None, metadata={"help": "steps between validation runs"})
    checkpoint_every: int | None = field(default=50, metadata={"help": "steps between checkpoints (for resume)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    val_fraction: float = field(default=0.0, metadata={"help": "fraction of the training file held out for validation"})
    eval_batch_size: int = field(default=8, metadata={"help": "examples per validation batch"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass: far less memory for about a third more compute"})
    packing: bool = field(default=False, metadata={
        "help": "pack short examples into full max_seq_len rows, with no attention across examples"})

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "max_seq_len", "keep_checkpoints", "eval_batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("max_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not is_number(self.learning_rate) or not 0 < self.learning_rate < 1:
            raise ConfigError("learning_rate", f"must be in (0, 1), got {self.learning_rate!r}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be a non-negative integer, got {self.warmup_steps!r}")
        if not is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and (not is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise ConfigError("max_grad_norm", f"must be positive or null, got {self.max_grad_norm!r}")
        if not is_number(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be in [0, 1), got {self.val_fraction!r}")
        if not is_int(self.seed) or self.seed < 0:
            raise ConfigError("seed", f"must be a non-negative integer, got {self.seed!r}")
        for name in ("gradient_checkpointing", "packing"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")


def _positive_int(name: str, value: Any) -> None:
    if not is_int(value) or value <= 0:
        raise ConfigError(name, f"must be a positive integer, got {value!r}")


@dataclass
class Resources:
    """Where a job trains: `devices` ranks on each of `nodes` machines (torch.distributed)."""

    devices: int = field(default=1, metadata={"help": "devices (GPUs; ranks on a CPU) on each node"})
    nodes: int = field(default=1, metadata={"help": "machines the job spans, each with `devices` devices"})
    sharding: str = field(default="none", metadata={
        "help": "none: every rank holds the whole base (DDP); full: the frozen base is sharded over the "
                "ranks, one FSDP2 unit per decoder layer (for bases too large for one device); a 4-bit base "
                "loads shardable either way, so the job resumes on any number of ranks"})

    def __post_init__(self) -> None:
        for name in ("devices", "nodes"):
            _positive_int(name, getattr(self, name))
        if self.sharding not in SHARDINGS:
            raise ConfigError("sharding", f"must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}")

    @property
    def world_size(self) -> int:
        return self.devices * self.nodes


@dataclass
class TrainJob:
    base_model: str
    train_file: str
    output_dir: str
    sbora: SBoRAConfig = field(default_factory=SBoRAConfig)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    resources: Resources = field(default_factory=Resources)
    quantization: str = "none"
    val_file: str | None = None
    device: str | None = None  # default: cuda when present, else cpu
    objective: str = field(default="sft", metadata={"help": "sft, or dpo on preference pairs"})
    beta: float = field(default=DPO_BETA, metadata={
        "help": "dpo: the strength of the pull towards the reference (TRL's and OpenAI's default 0.1)"})
    loss: str = field(default="sigmoid", metadata={"help": "dpo: sigmoid (the DPO paper's loss) or ipo"})
    init_adapter: str | None = field(default=None, metadata={
        "help": "an adapter directory to start from (its index sets and factors); for dpo, the reference"})

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError("quantization",
                              f"must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.objective not in OBJECTIVES:
            raise ConfigError("objective", f"must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not is_number(self.beta) or not 0 < self.beta <= 100:
            raise ConfigError("beta", f"must be in (0, 100], got {self.beta!r}")
        if self.loss not in DPO_LOSSES:
            raise ConfigError("loss", f"must be one of {', '.join(DPO_LOSSES)}, got {self.loss!r}")
        if self.objective == "dpo" and self.resources.world_size > 1:
            raise ConfigError("objective", "dpo trains on one device; set resources.devices and nodes to 1")
        if self.objective == "dpo" and self.hyperparameters.packing:
            raise ConfigError("hyperparameters.packing", "dpo batches whole pairs; set packing to false")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJob:
        """From the layout of a job file (YAML/JSON): method and hyperparameters as sub-mappings."""
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known - {"method"}
        if unknown:
            raise ConfigError(sorted(unknown)[0], f"unknown job field; known: {', '.join(sorted(known))}")
        method = data.pop("method", None) or data.pop("sbora", None) or {}
        sections = {"method": method, "hyperparameters": data.pop("hyperparameters", None) or {},
                    "resources": data.pop("resources", None) or {}}
        specs: dict[str, type] = {"method": SBoRAConfig, "hyperparameters": Hyperparameters, "resources": Resources}
        built: dict[str, Any] = {}
        for name, section in sections.items():
            if not isinstance(section, dict):
                raise ConfigError(name, "must be a mapping")
            extra = set(section) - {f.name for f in fields(specs[name])}
            if extra:
                raise ConfigError(f"{name}.{sorted(extra)[0]}", "unknown field")
            try:
                built[name] = specs[name](**section)
            except ConfigError as exc:
                raise ConfigError(f"{name}.{exc.field}", exc.message) from exc
        return cls(sbora=built["method"], hyperparameters=built["hyperparameters"], resources=built["resources"],
                   **data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["method"] = data.pop("sbora")
        return data
