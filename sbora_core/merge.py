"""Merging stored adapters into a plain base model: regional, in place, reversible.

Several adapters can be merged at once when, on every layer, their index sets
are disjoint: each then writes its own columns (FA) or rows (FB) and none
touches another's. The handle returned by `merge_adapters` restores every
region bit for bit. The engine uses this to switch adapters between batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sbora_core.adapter import ModuleDelta, SparseAdapter
from sbora_core.inject import linear_modules
from sbora_core.region import merged_region, put_region, take_region


class AdapterOverlapError(ValueError):
    """Two adapters change the same weights of a layer, so they cannot be composed."""


_REGION_KIND = {"sbora_fa": "columns", "sbora_fb": "rows", "lora": "the whole matrix"}


def find_overlap(adapters: list[SparseAdapter]) -> tuple[str, list[int], str] | None:
    """The first layer where two adapters' regions intersect: (layer, indices, kind), or None.

    Column sets (FA) and row sets (FB) are disjoint when they share no index.
    FA columns always cross FB rows, and LoRA changes every weight, so those
    pairs overlap whatever their indices.
    """
    seen: dict[str, list[ModuleDelta]] = {}
    for adapter in adapters:
        for name, delta in sorted(adapter.modules.items()):
            kind = _REGION_KIND[delta.variant]
            for other in seen.get(name, []):
                if other.variant != delta.variant or delta.variant == "lora":
                    return name, [], f"{kind} and {_REGION_KIND[other.variant]}, which cross"
                assert delta.indices is not None and other.indices is not None
                common = sorted(set(delta.indices.tolist()) & set(other.indices.tolist()))
                if common:
                    return name, common, kind
            seen.setdefault(name, []).append(delta)
    return None


def check_disjoint(adapters: list[SparseAdapter]) -> None:
    overlap = find_overlap(adapters)
    if overlap is not None:
        name, common, kind = overlap
        shown = ", ".join(map(str, common[:10])) + (" ..." if len(common) > 10 else "")
        detail = f"{kind} {shown}" if common else kind
        raise AdapterOverlapError(f"{name}: adapters overlap in {detail}; compose only adapters with disjoint index sets")


@dataclass
class MergeHandle:
    """What `merge_adapters` changed, and how to put it back."""

    model: nn.Module
    saved: list[tuple[str, ModuleDelta, torch.Tensor]] = field(default_factory=list)

    def unmerge(self) -> None:
        linears = linear_modules(self.model)
        for name, delta, original in reversed(self.saved):
            put_region(linears[name].weight.data, delta.variant, _indices_on(delta, original), original)
        self.saved.clear()


def _indices_on(delta: ModuleDelta, like: torch.Tensor) -> torch.Tensor | None:
    return None if delta.indices is None else delta.indices.to(like.device)


@torch.no_grad()
def merge_adapters(model: nn.Module, adapters: list[SparseAdapter]) -> MergeHandle:
    """Merge every adapter into `model`'s full-precision weights.

    All regions are computed and checked (finite, disjoint) before the first
    write, so a failure leaves the model untouched.
    """
    check_disjoint(adapters)
    linears = linear_modules(model)
    planned: list[tuple[str, ModuleDelta, torch.Tensor, torch.Tensor]] = []
    for adapter in adapters:
        for name, delta in sorted(adapter.modules.items()):
            layer = linears.get(name)
            if layer is None or (layer.out_features, layer.in_features) != delta.shape:
                raise ValueError(f"{name}: the model has no linear module of shape {delta.shape}")
            weight = layer.weight.data
            if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise ValueError(f"{name}: cannot merge into a quantised weight ({weight.dtype})")
            indices = _indices_on(delta, weight)
            original = take_region(weight, delta.variant, indices)
            delta_t = delta.delta().to(weight.device)
            planned.append((name, delta, original, merged_region(original, delta_t, name)))
    handle = MergeHandle(model)
    for name, delta, original, new in planned:
        put_region(linears[name].weight.data, delta.variant, _indices_on(delta, original), new)
        handle.saved.append((name, delta, original))
    return handle


def export_merged(base_model: str, adapters: list[SparseAdapter], directory: str | Path) -> Path:
    """A full-precision model directory with the adapters merged in.

    QSBoRA adapters were trained on a 4-bit base; their merge goes into the
    dequantised (original full-precision) weights.
    """
    from sbora_core.adapter_io import check_compatible
    from sbora_core.models import load_base_model

    base = load_base_model(base_model, quantization="none", device="cpu")
    for adapter in adapters:
        check_compatible(adapter, base.model, base.fingerprint)
    merge_adapters(base.model, adapters)
    directory = Path(directory)
    base.model.save_pretrained(directory)
    base.tokenizer.save_pretrained(directory)
    return directory
