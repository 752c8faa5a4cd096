"""Training objectives, side by side: what the loop asks for a step's loss and metrics.

An objective turns a step's micro-batches of items into a backward pass (the step's mean loss, its
tokens and its metrics, summed over the micro-batches) and scores validation items; the loop,
checkpoints and resume do not compare objective names.
- `SFT`: next-token cross-entropy over target tokens; its metric is token accuracy.
- `DPO`: the preference loss against reference log-probs computed once before the first step
  (`preference.reference_logps`), which it keeps in the checkpoints' trainer state; its metrics are
  TRL's rewards/chosen, rewards/rejected, rewards/margins and rewards/accuracies.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from sbora_core.method.config import ConfigError
from sbora_core.method.layers import SBoRALinear
from sbora_core.training.data import load_dataset
from sbora_core.training.distributed import RankStep
from sbora_core.training.evaluate import validation_metrics
from sbora_core.training.loss import token_loss_sum
from sbora_core.training.preference import (
    TokenizedPair,
    collate_pairs,
    dpo_loss,
    pair_logps,
    reference_logps,
    reward_sums,
)
from sbora_core.training.preference_records import PREFERENCE
from sbora_core.training.tokenization import IGNORE_INDEX, collate

REWARD_METRICS = ("rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies")


def backward_pass(model: torch.nn.Module, micro: list[dict[str, torch.Tensor]], autocast: Any,
                  device: torch.device, ranks: RankStep | None = None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Forward and backward over one step's micro-batches (CPU tensors from `collate`).

    Returns the step's mean loss per target token and its token accuracy, still on the device (read
    them once, not per micro-batch), and the tokens processed (padding excluded, counted before the
    copy to the device).
    On several ranks `micro` holds this rank's part of each micro-batch and `ranks` the rest: the
    loss and accuracy are normalised by the target tokens of every rank's parts, not this rank's (so
    the ranks' values add up to the one-process ones), and the loss runs through the data-parallel module.
    """
    step_targets = ranks.step_targets if ranks else sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
                                                        for b in micro)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    total = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro):
        on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with ranks.syncing(i) if ranks else nullcontext():
            with autocast:
                loss_sum, hits = ranks.loss_sum(on_device, i) if ranks else token_loss_sum(model, on_device)
                loss = loss_sum / max(1, step_targets)
            (ranks.for_backward(loss) if ranks else loss).backward()
        total += loss.detach()
        correct += hits.detach()
    return total, tokens, correct / max(1, step_targets)


class SFT:
    name = "sft"
    metric_names: tuple[str, ...] = ("mean_token_accuracy",)

    def prepare(self, model: torch.nn.Module, items: list[list[Any]], batch_size: int, pad_id: int) -> str | None:
        return None

    def step(self, model: torch.nn.Module, batches: list[list[Any]], pad_id: int, autocast: Any,
             device: torch.device, ranks: RankStep | None = None) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The step's mean loss, its tokens, and its metrics (metric_names' order), on the device."""
        micro = [collate(b, pad_id) for b in batches]
        loss, tokens, accuracy = backward_pass(model, micro, autocast, device, ranks)
        return loss, tokens, accuracy[None]

    def validation(self, model: torch.nn.Module, items: list[Any], batch_size: int, pad_id: int) -> dict[str, float]:
        return validation_metrics(model, items, batch_size, pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DPO:
    name = "dpo"
    metric_names: tuple[str, ...] = ("rewards_margins", "rewards_accuracies", "rewards_chosen", "rewards_rejected")

    def __init__(self, beta: float, loss: str) -> None:
        self.beta, self.loss = beta, loss
        self.reference: list[torch.Tensor] | None = None  # (N, 2) per item list: training, validation

    def prepare(self, model: torch.nn.Module, items: list[list[Any]], batch_size: int, pad_id: int) -> str | None:
        """The reference pass, unless a checkpoint brought the log-probs back. Dropout is off in
        the policy (as TRL's disable_dropout): the step-1 policy then equals the reference exactly,
        and the margins measure training, not dropout noise."""
        for module in model.modules():
            if isinstance(module, SBoRALinear):
                module.sbora_dropout, module.dropout_p = torch.nn.Identity(), 0.0
            elif isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if self.reference is not None:
            if [len(r) for r in self.reference] != [len(i) for i in items]:
                raise ValueError("the checkpoint's reference log-probs do not match this job's pairs")
            return None
        self.reference = [reference_logps(model, pairs, batch_size, pad_id) for pairs in items]
        return f"reference log-probs of {sum(len(i) for i in items)} pairs computed"

    def _pairs_loss(self, model: torch.nn.Module, pairs: list[TokenizedPair], reference: torch.Tensor, pad_id: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Summed loss and reward sums of `pairs` (on the device), and their tokens."""
        batch = collate_pairs(pairs, pad_id)
        tokens = int(batch["attention_mask"].sum())
        on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        ref = reference[batch["index"]].to(device)  # (B, 2)
        losses, chosen, rejected = dpo_loss(pair_logps(model, on_device), ref, self.beta, self.loss)
        return losses.sum(), reward_sums(chosen, rejected), tokens

    def step(self, model: torch.nn.Module, batches: list[list[Any]], pad_id: int, autocast: Any,
             device: torch.device, ranks: RankStep | None = None) -> tuple[torch.Tensor, int, torch.Tensor]:
        assert self.reference is not None and ranks is None  # single-rank: the job refuses several
        n = sum(len(b) for b in batches)
        total = torch.zeros((), dtype=torch.float64, device=device)
        rewards = torch.zeros(4, dtype=torch.float64, device=device)
        tokens = 0
        for pairs in batches:
            with autocast:
                loss_sum, sums, count = self._pairs_loss(model, pairs, self.reference[0], pad_id, device)
                loss = loss_sum / n
            loss.backward()
            total += loss.detach()
            rewards += sums
            tokens += count
        return total, tokens, self._ordered(rewards / n)

    @staticmethod
    def _ordered(sums: torch.Tensor) -> torch.Tensor:
        """reward_sums' order (chosen, rejected, margins, accuracies) in metric_names' order."""
        return sums[[2, 3, 0, 1]]

    @torch.no_grad()
    def validation(self, model: torch.nn.Module, items: list[Any], batch_size: int, pad_id: int) -> dict[str, float]:
        """Loss and rewards on validation pairs, in eval mode."""
        assert self.reference is not None
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total = torch.zeros((), dtype=torch.float64, device=device)
        rewards = torch.zeros(4, dtype=torch.float64, device=device)
        for start in range(0, len(items), batch_size):
            loss_sum, sums, _ = self._pairs_loss(model, items[start:start + batch_size], self.reference[1],
                                                 pad_id, device)
            total += loss_sum
            rewards += sums
        model.train(was_training)
        values = self._ordered(rewards / max(1, len(items))).tolist()
        return {"loss": total.item() / max(1, len(items)), **dict(zip(self.metric_names, values, strict=True))}

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state.get("reference")


def records_for(objective: str, field: str, path: str) -> list[Any]:
    """A data file's records; ConfigError naming `field` when its format does not suit the objective."""
    fmt, records = load_dataset(path)
    if (fmt == PREFERENCE) != (objective == "dpo"):
        want = "preference pairs" if objective == "dpo" else "chat, prompt/completion or instruction records"
        raise ConfigError(field, f"the file is {fmt}, but objective {objective} trains on {want}")
    return records


def objective_for(name: str, beta: float, loss: str) -> SFT | DPO:
    return DPO(beta, loss) if name == "dpo" else SFT()
