"""The regional update map of a stored adapter: per layer, which columns or rows change and how much.

SBoRA-FA changes the r columns I of W by (alpha/r)·B, so column k's change is
the k-th column of that product; SBoRA-FB changes the r rows J by (alpha/r)·A.
LoRA changes every column; its column norms come from the r×r Gram matrix
BᵀB, so the dense d_out×d_in product is never formed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch

from app.schemas import UpdateMapModule, UpdateMapPublic
from sbora_core.adapter import ModuleDelta
from sbora_core.adapter_io import load_adapter


def _natural(name: str) -> list:
    # layers.10 after layers.9, not after layers.1
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def module_map(name: str, delta: ModuleDelta) -> UpdateMapModule:
    d_out, d_in = delta.shape
    axis: Literal["columns", "rows"]
    if delta.variant != "lora":
        assert delta.indices is not None
        fa = delta.variant == "sbora_fa"
        axis, dim, indices = ("columns", d_in, delta.indices) if fa else ("rows", d_out, delta.indices)
        # delta() is (alpha/r)·B, shape (d_out, r), for FA; (alpha/r)·A, shape (r, d_in), for FB
        norms = delta.delta().float().norm(dim=0 if fa else 1)
    else:
        assert delta.A is not None and delta.B is not None
        axis, dim, indices = "columns", d_in, torch.arange(d_in)
        A, B = delta.A.float(), delta.B.float()
        squared = (A * ((B.T @ B) @ A)).sum(dim=0).clamp_min(0)  # ||B a_j||² for each column j
        norms = squared.sqrt() * float(delta.scaling)
    return UpdateMapModule(name=name, variant=delta.variant, axis=axis, dimension=dim, in_features=d_in,
                           out_features=d_out, indices=[int(i) for i in indices], norms=norms.tolist())


def update_map(adapter_id: str, directory: Path) -> UpdateMapPublic:
    adapter = load_adapter(directory)
    modules = [module_map(n, adapter.modules[n]) for n in sorted(adapter.modules, key=_natural)]
    config = adapter.config
    return UpdateMapPublic(adapter_id=adapter_id, variant=config.variant, r=config.r, alpha=config.alpha,
                           scaling=config.scaling, modules=modules,
                           max_norm=max((max(m.norms, default=0.0) for m in modules), default=0.0))
