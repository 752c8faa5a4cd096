"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint directory `checkpoints/step-NNNNNNN` holds the adapter (factors
and index sets, the ordinary adapter files) and `trainer_state.pt`: optimiser
and scheduler state, RNG states, the data position and the run's history. It
is written under a temporary name and renamed, so it exists whole or not at all.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sbora_core.method.adapter_io import load_adapter, save_adapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import adapter_from_model, adapter_layers

STATE_FILE = "trainer_state.pt"


@dataclass
class Position:
    """Where the run is: completed optimiser steps and the next micro-batch of the data."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # next micro-batch index within the epoch
    tokens: int = 0


@dataclass
class History:
    """What a run has measured so far; kept in checkpoints so a resumed run reports the whole run."""

    train_loss: list[list[float]] = field(default_factory=list)  # [step, loss] per optimiser step
    val_loss: list[list[float]] = field(default_factory=list)  # [step, loss] per validation
    elapsed_s: float = 0.0  # training time before the current process took over
    train_accuracy: list[list[float]] = field(default_factory=list)  # [step, token accuracy] per optimiser step
    val_accuracy: list[list[float]] = field(default_factory=list)  # [step, token accuracy] per validation
    # An objective's other metrics (DPO's rewards): name -> [step, value] per optimiser step / validation
    train_metrics: dict[str, list[list[float]]] = field(default_factory=dict)
    val_metrics: dict[str, list[list[float]]] = field(default_factory=dict)

    def curve(self, split: str, name: str) -> list[list[float]]:
        """The [step, value] list of metric `name` on split "train" or "val" (created when new)."""
        if name == "mean_token_accuracy":
            return self.train_accuracy if split == "train" else self.val_accuracy
        return (self.train_metrics if split == "train" else self.val_metrics).setdefault(name, [])

    def evaluated_at(self, step: int) -> bool:
        return bool(self.val_loss) and self.val_loss[-1][0] == step

    def recent_train_loss(self, last: int = 10) -> float | None:
        return self.recent(self.train_loss, last)

    @staticmethod
    def recent(curve: list[list[float]], last: int = 10) -> float | None:
        """The mean of a curve's last `last` values."""
        values = [value for _, value in curve[-last:]]
        return sum(values) / len(values) if values else None


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The complete checkpoints under `output_dir`, oldest first."""
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


def save_checkpoint(output_dir: Path, model: nn.Module, config: SBoRAConfig, optimizer: Any, scheduler: Any,
                    pos: Position, history: History, keep: int, objective: Any = None) -> Path:
    """Write a checkpoint at `pos.step` and drop all but the `keep` newest; `objective`'s state
    (DPO's reference log-probs) goes with the trainer state."""
    root = output_dir / "checkpoints"
    final = root / f"step-{pos.step:07d}"
    tmp = root / f".tmp-step-{pos.step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(adapter_from_model(model, config), tmp)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
             "position": asdict(pos), "history": asdict(history)}
    if objective is not None:
        state["objective"] = objective.state_dict()
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: Any, scheduler: Any,
                    objective: Any = None) -> tuple[Position, History]:
    """Restore the factors, optimiser, scheduler and RNG states; the position and history to continue from."""
    load_factors(model, path)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    if objective is not None and "objective" in state:
        objective.load_state_dict(state["objective"])
    return Position(**state["position"]), History(**state["history"])


def load_factors(model: nn.Module, path: Path) -> None:
    """Copy a stored adapter's (or checkpoint's) index sets and factors into the injected layers:
    how a resume restores them, and how a job starts from an existing adapter."""
    adapter = load_adapter(path)
    layers = dict(adapter_layers(model))
    for name, delta in adapter.modules.items():
        if name not in layers:
            raise ValueError(f"adapter {path.name}: layer {name} is not part of this job's adapter")
        layers[name].load_delta(delta)
