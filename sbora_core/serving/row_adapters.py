"""Different adapters for different rows of one batch, applied unmerged.

Each adapted layer keeps, per variant in use, a bank of row slots on the
model's device: slot i holds the index set and factor (scaling folded in) of the
adapters of the i-th row in flight. A forward hook adds all rows' updates with a
few batched kernels, whatever the number of adapters:
- FA: gather the selected input features of each row, `x[b, :, I_b]`, and
  multiply by that row's B (one `bmm`);
- FB: `A_b x` for each row (one `bmm`), added into the selected output rows J_b
  (one `scatter_add_`);
- LoRA: `B_b (A_b x)` (two `bmm`s).
Slots without an adapter on a layer hold zeros, which add nothing; a row that
composes several adapters of one variant concatenates their index sets.

The banks are allocated once, for as many rows as the engine runs at a time, and
grow only when a row's adapters are wider than any before. `RowBanks.arrange`
keeps slot i in step with the i-th row as rows join and leave: a row that stays
where it was costs nothing, one that moves up is a copy on the device, and a
new row is one copy of its factors into its slot. A row joining a running batch
therefore costs its own adapters' bytes, not a rebuild of every row's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sbora_core.method.adapter import ModuleDelta, SparseAdapter
from sbora_core.method.linear import is_adaptable_linear, shape_of
from sbora_core.method.variants import Variant


@dataclass
class Bank:
    """Some consecutive slots of one layer's bank for one variant, as one forward uses them."""

    variant: Variant
    indices: torch.Tensor | None  # (B, R) int64: FA columns / FB rows; None for LoRA
    A: torch.Tensor | None  # (B, R, d_in): FB (scaled) and LoRA
    B: torch.Tensor | None  # (B, d_out, R): FA (scaled) and LoRA (scaled)

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


class Slots:
    """One layer's bank for one variant: `capacity` rows of `width` index/factor columns."""

    COLUMNS_DIM = (1, 1, 2)  # where indices (n, R), A (n, R, d_in) and B (n, d_out, R) keep their R columns

    def __init__(self, variant: Variant, shape: tuple[int, int], capacity: int, width: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.variant, self.shape, self.dtype, self.device = variant, shape, dtype, device
        self.width = width
        d_out, d_in = shape
        self.indices, self.A, self.B = variant.new_bank(capacity, width, d_out, d_in, dtype, device)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t, _ in self.with_columns_dim()]

    def with_columns_dim(self) -> list[tuple[torch.Tensor, int]]:
        return [(t, dim) for t, dim in zip((self.indices, self.A, self.B), self.COLUMNS_DIM, strict=True)
                if t is not None]

    def widen(self, width: int) -> None:
        """Room for `width` columns per row; the rows' contents are kept (the new columns are zeros)."""
        d_out, d_in = self.shape
        old = self.with_columns_dim()
        self.indices, self.A, self.B = self.variant.new_bank(self.capacity, width, d_out, d_in, self.dtype,
                                                             self.device)
        for (new, dim), (kept, _) in zip(self.with_columns_dim(), old, strict=True):
            new.narrow(dim, 0, self.width).copy_(kept)
        self.width = width

    @property
    def capacity(self) -> int:
        return self.tensors()[0].shape[0]

    def move(self, to: torch.Tensor, source: torch.Tensor) -> None:
        """Slots `to` take the contents of slots `source` (read in full before any write)."""
        for t in self.tensors():
            t[to] = t[source]

    def fill(self, slot: int, deltas: Sequence[ModuleDelta]) -> None:
        """Slot `slot` holds these deltas side by side, zeros after them (where a wider set may have been)."""
        at = 0
        for delta in deltas:
            self.variant.fill_bank(self.indices, self.A, self.B, slot, slice(at, at + delta.r), delta)
            at += delta.r
        if at < self.width:
            for t, dim in self.with_columns_dim():
                t[slot].narrow(dim - 1, at, self.width - at).zero_()

    def view(self, start: int, count: int) -> Bank:
        def rows(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:start + count]

        return Bank(self.variant, rows(self.indices), rows(self.A), rows(self.B))


class RowBanks:
    """Every adapted layer's slots, kept in step with the rows in flight (see the module docstring)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], capacity: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.shapes, self.capacity, self.device, self.dtype = shapes, capacity, device, dtype
        self.layers: dict[str, dict[Variant, Slots]] = {}
        self.owners: list[object | None] = [None] * capacity  # the row each slot holds now
        self.copied_rows = 0  # slots filled from an adapter so far (moves not counted)
        self.layout = 0  # bumped when a bank is added or widened: cached views are stale then
        self._views: dict[tuple[int, int], dict[str, list[Bank]]] = {}  # by (start, count), for this layout

    def arrange(self, rows: Sequence[tuple[object, Sequence[SparseAdapter]]]) -> None:
        """Slot i holds the adapters of rows[i] = (owner, adapters); an owner is compared by identity
        and a slot it held before is reused. Slots past len(rows) keep what they hold."""
        if len(rows) > self.capacity:
            raise ValueError(f"{len(rows)} rows in flight, but the banks hold {self.capacity}")
        if all(self.owners[i] is owner for i, (owner, _) in enumerate(rows)):
            return
        where = {id(owner): slot for slot, owner in enumerate(self.owners) if owner is not None}
        moves = [(i, where[id(owner)]) for i, (owner, _) in enumerate(rows)
                 if id(owner) in where and where[id(owner)] != i]
        fresh = [(i, adapters) for i, (owner, adapters) in enumerate(rows) if id(owner) not in where]
        self._make_room([adapters for _, adapters in fresh])
        if moves:
            to = torch.tensor([i for i, _ in moves], device=self.device)
            source = torch.tensor([s for _, s in moves], device=self.device)
            for by_variant in self.layers.values():
                for slots in by_variant.values():
                    slots.move(to, source)
        for slot, adapters in fresh:
            for name, by_variant in self.layers.items():
                for variant, slots in by_variant.items():
                    slots.fill(slot, _deltas(adapters, name, variant))
            self.copied_rows += 1
        placed = {id(owner) for owner, _ in rows}
        owners = [None if id(o) in placed else o for o in self.owners]  # a moved row's old slot is free
        for i, (owner, _) in enumerate(rows):
            owners[i] = owner
        self.owners = owners

    def _make_room(self, new_rows: list[Sequence[SparseAdapter]]) -> None:
        """Banks for every layer and variant the new rows use, wide enough for each of them."""
        for adapters in new_rows:
            widths: dict[tuple[str, Variant], int] = {}
            for adapter in adapters:
                for name, delta in adapter.modules.items():
                    widths[name, delta.variant] = widths.get((name, delta.variant), 0) + delta.r
            for (name, variant), width in widths.items():
                by_variant = self.layers.setdefault(name, {})
                slots = by_variant.get(variant)
                if slots is None:
                    by_variant[variant] = Slots(variant, self.shapes[name], self.capacity, width, self.dtype,
                                                self.device)
                    self.layout += 1
                    self._views.clear()
                elif slots.width < width:
                    slots.widen(width)
                    self.layout += 1
                    self._views.clear()

    def views(self, start: int, count: int) -> dict[str, list[Bank]]:
        """Per layer, the banks for slots start .. start+count-1, as the hooks apply them."""
        views = self._views.get((start, count))  # decode, prefill and padded graph steps alternate
        if views is None:
            views = self._views[start, count] = {name: [slots.view(start, count) for slots in by_variant.values()]
                                                 for name, by_variant in self.layers.items()}
        return views

    def release(self) -> None:
        """Forget the owners (the rows are gone); the banks stay allocated for the next mixed batch."""
        self.owners = [None] * self.capacity


def _deltas(adapters: Sequence[SparseAdapter], name: str, variant: Variant) -> list[ModuleDelta]:
    return [d for a in adapters if (d := a.modules.get(name)) is not None and d.variant is variant]


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

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
