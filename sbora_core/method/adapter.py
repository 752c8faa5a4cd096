"""Adapters as data: what one trained adapter holds, independent of any model.

A `SparseAdapter` maps module names (e.g. `model.layers.0.self_attn.q_proj`)
to `ModuleDelta`s. For SBoRA a delta is an index set (r integers) plus one
trainable factor; for LoRA it is the two dense factors. Files, merging and the
inference engine all work from this form.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sbora_core.method.config import SBoRAConfig
from sbora_core.method.variants import Variant, get_variant


@dataclass
class ModuleDelta:
    variant: Variant  # a variant's name is accepted and replaced by the object
    scaling: float
    shape: tuple[int, int]  # (d_out, d_in) of the base layer
    indices: torch.Tensor | None = None  # (r,) int64; FA: columns I, FB: rows J; None for LoRA
    A: torch.Tensor | None = None  # (r, d_in): trained in FB and LoRA
    B: torch.Tensor | None = None  # (d_out, r): trained in FA and LoRA

    def __post_init__(self) -> None:
        self.variant = get_variant(self.variant)

    @property
    def r(self) -> int:
        if self.indices is not None:
            return int(self.indices.numel())
        assert self.A is not None
        return int(self.A.shape[0])

    @property
    def sbora_factor(self) -> torch.Tensor:
        """The one trained factor of an SBoRA delta: B (FA) or A (FB)."""
        assert self.variant.sparse
        return self.variant.trained_factor(self.A, self.B)

    def factors(self) -> dict[str, torch.Tensor]:
        return {k: t for k, t in (("A", self.A), ("B", self.B)) if t is not None}

    def delta(self) -> torch.Tensor:
        """The region's change; see `Variant.delta`."""
        return self.variant.delta(self.scaling, self.A, self.B)

    def dense_delta(self) -> torch.Tensor:
        """The full (d_out, d_in) delta W. For tests and exports, never a hot path."""
        region = self.delta()
        full = torch.zeros(*self.shape, dtype=region.dtype)
        self.variant.put_region(full, self.indices, region)
        return full

    def trainable_params(self) -> int:
        return sum(t.numel() for t in self.factors().values())


@dataclass
class SparseAdapter:
    config: SBoRAConfig
    modules: dict[str, ModuleDelta]
    metadata: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # what messages call it (a registry id); not stored in the files

    @property
    def fingerprint(self) -> str | None:
        return self.config.base_fingerprint

    def trainable_params(self) -> int:
        return sum(m.trainable_params() for m in self.modules.values())

    def scaled(self, weight: float) -> SparseAdapter:
        """This adapter with every update multiplied by `weight` (the factors are shared, not copied):
        exact, since each region's change is (alpha/r)·factor and only the scaling moves."""
        modules = {n: replace(d, scaling=d.scaling * weight) for n, d in self.modules.items()}
        return SparseAdapter(self.config, modules, self.metadata, f"{self.name or 'adapter'}×{weight:g}")

    def place(self, device: torch.device | str) -> SparseAdapter:
        """Move the factors to `device`, in place, so that merges and row banks copy nothing from the
        host. Index sets stay on the host: they are r integers, and merges key their region cache by
        the indices' bytes, which a device tensor would give only through a synchronising copy."""
        for m in self.modules.values():
            m.A = None if m.A is None else m.A.to(device)
            m.B = None if m.B is None else m.B.to(device)
        return self

    def nbytes(self) -> int:
        """Bytes of tensor data (factors and index sets as stored: int32 indices)."""
        total = 0
        for m in self.modules.values():
            total += sum(t.numel() * t.element_size() for t in m.factors().values())
            if m.indices is not None:
                total += m.indices.numel() * 4
        return total
