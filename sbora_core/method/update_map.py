"""The regional update map of an adapter: per layer, which columns or rows change and how much.

SBoRA-FA changes the r columns I of W by (alpha/r)·B, so column k's change is
the k-th column of that product; SBoRA-FB changes the r rows J by (alpha/r)·A.
LoRA changes every column; its column norms come from the r×r Gram matrix
BᵀB, so the dense d_out×d_in product is never formed. Each variant computes
its own norms (`Variant.update_norms`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sbora_core.method.adapter import ModuleDelta, SparseAdapter


@dataclass
class ModuleUpdate:
    """One adapted layer: which columns or rows of W change, and by how much."""

    name: str
    variant: str
    axis: str  # "columns" or "rows"
    dimension: int  # in_features for columns, out_features for rows
    in_features: int
    out_features: int
    indices: list[int]  # the changed columns/rows; all of them for LoRA
    norms: list[float]  # L2 norm of each changed column/row of (alpha/r)·factor


@dataclass
class UpdateMap:
    variant: str
    r: int
    alpha: float
    scaling: float
    max_norm: float
    modules: list[ModuleUpdate]


def _natural(name: str) -> list:
    # layers.10 after layers.9, not after layers.1
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def module_update(name: str, delta: ModuleDelta) -> ModuleUpdate:
    d_out, d_in = delta.shape
    axis, dimension, indices, norms = delta.variant.update_norms(delta)
    return ModuleUpdate(name=name, variant=delta.variant.name, axis=axis, dimension=dimension, in_features=d_in,
                        out_features=d_out, indices=[int(i) for i in indices], norms=norms.tolist())


def update_map(adapter: SparseAdapter) -> UpdateMap:
    modules = [module_update(n, adapter.modules[n]) for n in sorted(adapter.modules, key=_natural)]
    config = adapter.config
    return UpdateMap(variant=config.variant, r=config.r, alpha=config.alpha, scaling=config.scaling,
                     max_norm=max((max(m.norms, default=0.0) for m in modules), default=0.0), modules=modules)
