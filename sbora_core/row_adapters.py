"""Different adapters for different rows of one batch, applied unmerged.

For a batch whose rows use different adapters (or adapter sets), each adapted
layer gets, per variant present, a "bank": every row's index set and factor
stacked along the batch dimension, with the scaling folded in. A forward hook
then adds all rows' updates with a few batched kernels, whatever the number of
adapters:
- FA: gather the selected input features of each row, `x[b, :, I_b]`, and
  multiply by that row's B (one `bmm`);
- FB: `A_b x` for each row (one `bmm`), added into the selected output rows J_b
  (one `scatter_add_`);
- LoRA: `B_b (A_b x)` (two `bmm`s).
Rows without an adapter on a layer get zero factors, which add nothing. A row
that composes several adapters of one variant concatenates their index sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sbora_core.adapter import ModuleDelta, SparseAdapter
from sbora_core.linear import is_adaptable_linear, shape_of
from sbora_core.variants import Variant


@dataclass
class Bank:
    variant: Variant
    indices: torch.Tensor | None  # (B, R) int64: FA columns / FB rows; None for LoRA
    A: torch.Tensor | None  # (B, R, d_in): FB (scaled) and LoRA
    B: torch.Tensor | None  # (B, d_out, R): FA (scaled) and LoRA (scaled)

    def select(self, rows: torch.Tensor) -> Bank:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, rows)

        return Bank(self.variant, pick(self.indices), pick(self.A), pick(self.B))

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + this bank's per-row updates; x (B, T, d_in), out (B, T, d_out).

        Some decoders (OPT's MLP) flatten the batch to (B*T, d) first; the rows stay batch-major, so
        viewing them as (B, T, d) again lines each one up with its own adapter."""
        if x.dim() == 2:
            rows = (self.B if self.B is not None else self.A).shape[0]  # type: ignore[union-attr]
            flat = self.variant.apply_bank(x.reshape(rows, -1, x.shape[-1]), out.reshape(rows, -1, out.shape[-1]),
                                           self.indices, self.A, self.B)
            return flat.reshape(out.shape)
        return self.variant.apply_bank(x, out, self.indices, self.A, self.B)


def build_banks(
    rows: list[list[SparseAdapter]], shapes: dict[str, tuple[int, int]], device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> dict[str, list[Bank]]:
    """Per module name, one bank per variant used by any row."""
    banks: dict[str, list[Bank]] = {}
    names = sorted({name for adapters in rows for a in adapters for name in a.modules})
    n = len(rows)
    for name in names:
        d_out, d_in = shapes[name]
        by_variant: dict[Variant, list[list[ModuleDelta]]] = {}
        for row, adapters in enumerate(rows):
            for adapter in adapters:
                delta = adapter.modules.get(name)
                if delta is not None:
                    by_variant.setdefault(delta.variant, [[] for _ in range(n)])[row].append(delta)
        module_banks = []
        for variant, per_row in by_variant.items():
            width = max(sum(d.r for d in deltas) for deltas in per_row)
            indices, A, B = variant.new_bank(n, width, d_out, d_in, dtype)
            for row, deltas in enumerate(per_row):
                at = 0
                for d in deltas:
                    variant.fill_bank(indices, A, B, row, slice(at, at + d.r), d)
                    at += d.r

            def to(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t.to(device)

            module_banks.append(Bank(variant, to(indices), to(A), to(B)))
        banks[name] = module_banks
    return banks


class RowAdapterHooks:
    """Forward hooks on a model's linear layers that apply the active banks, if any."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = {n: m for n, m in model.named_modules() if is_adaptable_linear(m)}
        self.active: dict[str, list[Bank]] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {n: shape_of(m) for n, m in self.modules.items()}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            banks = self.active.get(name)
            if not banks:
                return None
            x = args[0]
            for bank in banks:
                out = bank.apply(x, out)
            return out

        return hook

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished requests leave the batch)."""
        self.active = {n: [b.select(rows) for b in banks] for n, banks in self.active.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
