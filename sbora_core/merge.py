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
from sbora_core.layers import is_quantized_linear
from sbora_core.variants import Variant, check_factor


class AdapterOverlapError(ValueError):
    """Two adapters change the same weights of a layer, so they cannot be composed."""


def find_overlap(adapters: list[SparseAdapter]) -> tuple[str, list[int], str] | None:
    """The first layer where two adapters' regions intersect: (layer, indices, kind), or None.

    Column sets (FA) and row sets (FB) are disjoint when they share no index.
    FA columns always cross FB rows, and LoRA changes every weight, so those
    pairs overlap whatever their indices.
    """
    seen: dict[str, list[ModuleDelta]] = {}
    for adapter in adapters:
        for name, delta in sorted(adapter.modules.items()):
            kind = delta.variant.region_kind
            for other in seen.get(name, []):
                if other.variant is not delta.variant or not delta.variant.sparse:
                    return name, [], f"{kind} and {other.variant.region_kind}, which cross"
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


class RegionCache:
    """Base-weight regions read once and reused by every later merge of the same index set.

    Reading r strided columns is the costliest step of an FA merge on a CPU; with
    the original region cached, a swap only writes. Adapters trained with the
    same `index_seed` on the same base share their index sets, hence entries.
    Valid while the weights outside merged regions stay the base model's: the
    owner must unmerge before merging something else (the engine does).
    """

    def __init__(self) -> None:
        self._regions: dict[tuple[str, str, bytes], torch.Tensor] = {}

    def original(self, name: str, weight: torch.Tensor, variant: Variant, indices: torch.Tensor) -> torch.Tensor:
        key = (name, variant.name, indices.cpu().numpy().tobytes())
        region = self._regions.get(key)
        if region is None:
            region = self._regions[key] = variant.take_region(weight, indices)
        return region

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._regions.values())

    def clear(self) -> None:
        self._regions.clear()


@dataclass
class MergeHandle:
    """What `merge_adapters` changed, and how to put it back."""

    saved: list[tuple[torch.Tensor, Variant, torch.Tensor | None, torch.Tensor]] = field(default_factory=list)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore every merged region bit for bit (in reverse order of merging)."""
        for weight, variant, indices, original in reversed(self.saved):
            variant.put_region(weight, indices, original)
        self.saved.clear()


@torch.no_grad()
def merge_adapters(
    model: nn.Module, adapters: list[SparseAdapter], regions: RegionCache | None = None
) -> MergeHandle:
    """Merge every adapter into `model`'s full-precision weights.

    All regions are computed and checked (finite, disjoint) before the first
    write, so a failure leaves the model untouched. With a `RegionCache`, the
    original regions come from (and go into) the cache instead of being read.
    """
    check_disjoint(adapters)
    linears = linear_modules(model, {name for adapter in adapters for name in adapter.modules})
    planned: list[tuple[torch.Tensor, ModuleDelta, torch.Tensor | None, torch.Tensor, torch.Tensor | None]] = []
    for adapter in adapters:
        for name, delta in adapter.modules.items():
            layer = linears.get(name)
            if layer is None or (layer.out_features, layer.in_features) != delta.shape:
                raise ValueError(f"{name}: the model has no linear module of shape {delta.shape}")
            weight = layer.weight.data
            if not weight.is_floating_point() or is_quantized_linear(layer):
                raise ValueError(f"{name}: cannot merge into a quantised weight; load the base in full precision")
            indices = None if delta.indices is None else delta.indices.to(weight.device)
            if regions is not None and indices is not None:
                original = regions.original(name, weight, delta.variant, indices)
            else:
                original = delta.variant.take_region(weight, indices)
            if delta.variant.sparse:  # checked once per factor; the write is then a single kernel
                check_factor(delta.sbora_factor, delta.scaling, weight.dtype, name)
                new = None
            else:
                new = delta.variant.merged_region(original, delta.scaling, delta.A, delta.B, name)
            planned.append((weight, delta, indices, original, new))
    handle = MergeHandle()
    for weight, delta, indices, original, new in planned:
        if new is not None:
            delta.variant.put_region(weight, indices, new)
        else:
            assert indices is not None  # every SBoRA delta has its index set
            delta.variant.add_to_region(weight, indices, original, delta.sbora_factor, delta.scaling)
        handle.saved.append((weight, delta.variant, indices, original))
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
