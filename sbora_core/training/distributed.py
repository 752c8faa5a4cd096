"""Data-parallel training on torch.distributed: the ranks of one job and what each does of a step.

A job on N ranks (torchrun's processes, `launch.py`) trains the adapter one process would, within
float rounding, because:
- every rank reads the whole data in the same order and takes a contiguous part of each
  micro-batch, so `batch_size` stays the global batch whatever N is;
- each rank's loss is its token losses over the target tokens of the whole step (every rank,
  every micro-batch; known locally, since every rank sees every micro-batch), not over its own
  (torchtune #1917), and is scaled by N: DDP averages gradients, so the average is the sum;
- the trainable factors are replicated and DDP all-reduces their gradients once per step
  (`no_sync` on the other micro-batches); with sharding "full" the frozen base is sharded by
  FSDP2, one unit per decoder layer plus the root (embeddings, head), and the factors are left
  out of every unit (`ignored_params`): nothing is reduce-scattered, so FSDP2's gradient
  averaging on gloo (pytorch #162338) never applies;
- factors and optimiser state are whole on every rank, so rank 0 alone writes checkpoints and
  the adapter, in the single-process formats, and a checkpoint resumes on any number of ranks.

Dropout on several ranks draws from a generator seeded per (seed, step, rank): a resumed run
draws what the uninterrupted one did. Exactness across different N holds without dropout (the
masks of a split batch differ from the whole batch's).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from sbora_core.method.inject import adapter_layers
from sbora_core.method.linear import is_quantized_linear
from sbora_core.training.tokenization import IGNORE_INDEX, TokenizedExample, collate

T = TypeVar("T")
# (summed token loss, correct tokens) of a batch
LossSum = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Ranks:
    """This process's place in a job's ranks, and the process group its training collectives use."""

    rank: int
    world_size: int
    local_rank: int
    group: Any  # ProcessGroup with the step timeout: a dead peer fails a collective in seconds, not 10 min
    sharding: str = "none"

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints, events and the adapter; the others only compute."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def part(self, batch: list[T]) -> tuple[list[T], float]:
        """This rank's contiguous part of a micro-batch and its weight: a rank left without an
        example computes a stand-in of weight 0 (its collectives must still run)."""
        n, w = len(batch), self.world_size
        size = n // w + (1 if self.rank < n % w else 0)
        start = self.rank * (n // w) + min(self.rank, n % w)
        return (batch[start:start + size], 1.0) if size else (batch[:1], 0.0)

    def step(self, batches: list[list[TokenizedExample]], loss_module: nn.Module, seed: int,
             step: int) -> RankStep:
        """What this rank computes of the optimiser step made of `batches` (every rank's micro-batches)."""
        # Dropout draws from the global generator: seed it per step so a resumed run draws the same masks.
        torch.manual_seed((seed * 1_000_003 + step) * 65_537 + self.rank)
        parts = [self.part(batch) for batch in batches]
        return RankStep(
            parts=[examples for examples, _ in parts], weights=[weight for _, weight in parts],
            step_targets=sum(_shifted_targets(e) for batch in batches for e in batch),
            step_tokens=sum(len(e.input_ids) for batch in batches for e in batch),
            loss_module=loss_module, world_size=self.world_size)

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the ranks (the step's loss from each rank's part)."""
        summed = value.detach().clone()
        dist.all_reduce(summed, group=self.group)
        return summed

    def check_same_step(self, step: int) -> None:
        """Every rank resumed from the same checkpoint (ranks on several machines read their own copies)."""
        steps = torch.tensor([step, -step], device=self.device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX, group=self.group)
        if int(steps[0]) != -int(steps[1]):
            raise ValueError(f"the ranks resumed from different checkpoints (steps {-int(steps[1])} to "
                             f"{int(steps[0])}); every machine must hold the same newest checkpoint")

    def decided_by_writer(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank: all ranks stop at the same step or none does."""
        value = torch.tensor([1 if flag else 0], device=self.device)
        dist.broadcast(value, group_src=0, group=self.group)
        return bool(value.item())


def _shifted_targets(example: TokenizedExample) -> int:
    """Target tokens the loss counts: every label but the first (nothing predicts it)."""
    return sum(1 for t in example.labels[1:] if t != IGNORE_INDEX)


@dataclass
class RankStep:
    """One rank's share of an optimiser step: its part of each micro-batch, and the whole step's
    target tokens, by which every rank normalises its loss."""

    parts: list[list[TokenizedExample]]
    weights: list[float]  # 1, or 0 for a stand-in part
    step_targets: int
    step_tokens: int  # padding excluded, every rank's
    loss_module: nn.Module  # DDP over LossModule: its forward is the loss sum; it syncs gradients
    world_size: int

    def syncing(self, index: int) -> Any:
        """DDP all-reduces the factors' gradients after the step's last micro-batch only."""
        no_sync = getattr(self.loss_module, "no_sync", None)
        return no_sync() if no_sync is not None and index < len(self.parts) - 1 else nullcontext()

    def loss_sum(self, batch: dict[str, torch.Tensor], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, correct tokens) of this rank's part of micro-batch `index`; 0 for a stand-in."""
        loss, correct = self.loss_module(batch)
        return loss * self.weights[index], correct * self.weights[index]

    def for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """DDP averages over the ranks; the ranks' losses are parts of one sum."""
        return loss * self.world_size


class LossModule(nn.Module):
    """A step's loss sum as a module: DDP and FSDP2 act through a module's forward, and the loss
    does not go through the model's own (on plain-head families it calls the decoder and head)."""

    def __init__(self, model: nn.Module, loss_sum: LossSum) -> None:
        super().__init__()
        self.model = model
        self.loss_sum = loss_sum

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_sum(self.model, batch)


# -- process groups ---------------------------------------------------------------------------------
def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def join_ranks(sharding: str, step_timeout_s: float, setup_timeout_s: float) -> Ranks:
    """Join the job's process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Loading a large base can take longer on one machine than another, so the default group (used
    once, to form the training group) waits `setup_timeout_s`; every training collective uses a
    group that gives up after `step_timeout_s`."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend(), timeout=timedelta(seconds=setup_timeout_s))
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                 group=None, sharding=sharding)


def open_training_group(ranks: Ranks, step_timeout_s: float) -> None:
    """The group of the training collectives (collective on the default group: every rank has loaded)."""
    ranks.group = dist.new_group(backend=backend(), timeout=timedelta(seconds=step_timeout_s))


def leave_ranks() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- wrapping ---------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (the classes it names in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"sharding: cannot tell the decoder layers of {type(model).__name__} apart; "
                         "use sharding 'none'")
    return layers


def shard_frozen_base(root: nn.Module, model: nn.Module, mesh: Any, factors: list[nn.Parameter]) -> None:
    """FSDP2 over the frozen base: one unit per decoder layer, the root holding the rest; the
    factors stay whole on every rank (left out of every unit)."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(factors)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(root, mesh=mesh, ignored_params=ignored)


def data_parallel(model: nn.Module, loss_sum: LossSum, ranks: Ranks, factors: list[nn.Parameter]) -> nn.Module:
    """The module a rank trains through: DDP over the factors of `LossModule(model)`, with the
    frozen base sharded first when `ranks.sharding` is "full"."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.nn.parallel import DistributedDataParallel

    module = LossModule(model, loss_sum)
    if ranks.sharding == "full":
        # A sharded weight is gathered anew for every forward: the merged fast path has no weight to keep.
        for _, layer in adapter_layers(model):
            layer.unmerge()
        shard_frozen_base(module, model, DeviceMesh.from_group(ranks.group, ranks.device.type), factors)
    # DDP syncs only the factors: the frozen base is identical on every rank by construction (or sharded).
    trained = {id(p) for p in factors}
    frozen = [n for n, p in module.named_parameters() if id(p) not in trained]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, frozen + [n for n, _ in module.named_buffers()])
    device_ids = [ranks.local_rank] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, process_group=ranks.group)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter's local part: a shard's for FSDP2's DTensors, the whole tensor otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the frozen base and of the trainable factors held by this rank."""
    frozen = trainable = 0
    for p in model.parameters():
        local = local_tensor(p)
        size = local.numel() * local.element_size()
        if p.requires_grad:
            trainable += size
        else:
            frozen += size
    return {"frozen": frozen, "trainable": trainable}


# -- evaluation -------------------------------------------------------------------------------------
@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout), except 4-bit layers: in eval mode bitsandbytes repacks a CPU weight in
    place, which would write into FSDP2's gathered buffer."""
    was_training = model.training
    model.eval()
    for module in model.modules():
        if is_quantized_linear(module):
            module.train()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def validation_metrics(root: nn.Module, model: nn.Module, examples: list[TokenizedExample], batch_size: int,
                       pad_id: int, ranks: Ranks) -> dict[str, float]:
    """Mean next-token loss and token accuracy over every target token of `examples`, the batches
    spread over the ranks; every rank runs as many forwards (FSDP2 gathers each layer collectively),
    stand-ins uncounted."""
    chunks = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    mine = chunks[ranks.rank::ranks.world_size]
    rounds = -(-len(chunks) // ranks.world_size)
    sums = torch.zeros(3, dtype=torch.float64, device=ranks.device)  # (loss sum, correct, target tokens)
    with evaluating(model):
        for i in range(rounds):
            chunk = mine[i] if i < len(mine) else chunks[0]
            batch = {k: v.to(ranks.device) for k, v in collate(chunk, pad_id).items()}
            loss, correct = root(batch)
            if i < len(mine):
                sums[0] += loss.double()
                sums[1] += correct.double()
                sums[2] += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if callable(reshard := getattr(root, "reshard", None)):
        reshard()  # FSDP2 keeps the root gathered after a forward for the backward, which eval never runs
    dist.all_reduce(sums, group=ranks.group)
    count = sums[2].clamp(min=1)
    return {"loss": float(sums[0] / count), "mean_token_accuracy": float(sums[1] / count)}
