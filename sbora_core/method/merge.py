"""Merging stored adapters into a plain base model: regional, in place, reversible.

Several adapters can be merged at once when, on every layer, their index sets
are disjoint: each then writes its own columns (FA) or rows (FB) and none
touches another's. The handle returned by `merge_adapters` restores every
region bit for bit. The engine uses this to switch adapters between batches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sbora_core.method.adapter import ModuleDelta, SparseAdapter
from sbora_core.method.adapter_io import check_compatible
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import linear_modules
from sbora_core.method.linear import is_quantized_linear, shape_of, weight_matrix
from sbora_core.method.models import load_base_model
from sbora_core.method.variants import Variant, check_factor


class AdapterOverlapError(ValueError):
    """Two adapters change the same weights of a layer, so they cannot be composed."""


def find_overlap(adapters: list[SparseAdapter]) -> tuple[str, list[int], str, int, int] | None:
    """The first layer where two adapters' regions intersect: (layer, indices, kind, i, j) with i, j
    the positions of the two adapters in `adapters`, or None.

    Column sets (FA) and row sets (FB) are disjoint when they share no index.
    FA columns always cross FB rows, and LoRA changes every weight, so those
    pairs overlap whatever their indices.
    """
    seen: dict[str, list[tuple[int, ModuleDelta]]] = {}
    for j, adapter in enumerate(adapters):
        for name, delta in sorted(adapter.modules.items()):
            kind = delta.variant.region_kind
            for i, other in seen.get(name, []):
                if other.variant is not delta.variant or not delta.variant.sparse:
                    return name, [], f"{kind} and {other.variant.region_kind}, which cross", i, j
                assert delta.indices is not None and other.indices is not None
                common = sorted(set(delta.indices.tolist()) & set(other.indices.tolist()))
                if common:
                    return name, common, kind, i, j
            seen.setdefault(name, []).append((j, delta))
    return None


def check_disjoint(adapters: list[SparseAdapter]) -> None:
    """AdapterOverlapError naming the two adapters and the first layer where they overlap."""
    overlap = find_overlap(adapters)
    if overlap is not None:
        name, common, kind, i, j = overlap
        shown = ", ".join(map(str, common[:10])) + (" ..." if len(common) > 10 else "")
        detail = f"{kind} {shown}" if common else kind
        first, second = (adapters[k].name or f"#{k + 1}" for k in (i, j))
        raise AdapterOverlapError(f"adapters {first} and {second} overlap in {name}, in {detail}; compose only "
                                  "adapters with disjoint index sets (train them in one adapter group)")


def compose_adapters(adapters: list[SparseAdapter], weights: list[float] | None = None) -> SparseAdapter:
    """One adapter that is the exact sum of `adapters`, each update multiplied by its weight.

    SBoRA adapters of one variant with disjoint index sets only: each layer's index set is the
    union of the parts' (zero-factor padding fills the layers some parts leave out, so every layer
    has the same rank), the factor holds each part's factor times its scaling and weight, and
    the composition's own scaling is 1.
    """
    if not adapters:
        raise ValueError("nothing to compose")
    weights = weights if weights is not None else [1.0] * len(adapters)
    variant = adapters[0].config.kind
    if not variant.sparse or any(a.config.kind is not variant for a in adapters):
        raise ValueError(f"only SBoRA adapters of one variant compose exactly (these are "
                         f"{sorted({a.config.variant for a in adapters})})")
    if len({a.fingerprint for a in adapters}) > 1:
        raise ValueError("the adapters were trained on different base models")
    check_disjoint(adapters)
    rank = sum(a.config.r for a in adapters)
    layers = sorted({name for a in adapters for name in a.modules})
    modules: dict[str, ModuleDelta] = {}
    for name in layers:
        parts = [(a.modules[name], w) for a, w in zip(adapters, weights, strict=True) if name in a.modules]
        shape = parts[0][0].shape
        dim = variant.selection_dim(*shape)
        indices = torch.cat([d.indices for d, _ in parts])  # type: ignore[misc]
        factor = torch.cat([d.sbora_factor.float() * (d.scaling * w) for d, w in parts],
                           dim=1 if variant.trained == ("B",) else 0)
        if len(indices) < rank:  # layers some parts leave out: unused indices with zero factors
            unused = torch.ones(dim, dtype=torch.bool)
            unused[indices] = False
            pad = unused.nonzero().flatten()[: rank - len(indices)]
            zeros = torch.zeros_like(factor.narrow(1 if variant.trained == ("B",) else 0, 0, len(pad)))
            indices = torch.cat([indices, pad])
            factor = torch.cat([factor, zeros], dim=1 if variant.trained == ("B",) else 0)
        A, B = (None, factor) if variant.trained == ("B",) else (factor, None)
        modules[name] = ModuleDelta(variant, 1.0, shape, indices=indices, A=A, B=B)
    config = SBoRAConfig(variant=variant.name, r=rank, alpha=float(rank), dropout=0.0,
                         target_modules=sorted({n.split(".")[-1] for n in layers}),
                         base_fingerprint=adapters[0].fingerprint)
    parts_info = [{"adapter_id": a.name, "weight": w} for a, w in zip(adapters, weights, strict=True)]
    return SparseAdapter(config, modules, {"composed_of": parts_info})


class RegionCache:
    """One model's base-weight regions, read once and reused by every later merge of the same index set.

    Reading r strided columns is the costliest step of an FA merge on a CPU; with
    the original region cached, a swap only writes. Each entry keeps its index
    set on the weight's device, so a merge on a GPU copies nothing from the host
    and waits for nothing; the model's layers are looked up and checked once.
    Adapters trained with the same `index_seed` on the same base share their
    index sets, hence entries; the most recently used are kept up to
    `capacity_bytes`.
    Valid while the weights outside merged regions stay the base model's: the
    owner must unmerge before merging something else (the engine does).
    """

    def __init__(self, capacity_bytes: int = 1 << 30) -> None:
        self.capacity_bytes = capacity_bytes
        self._regions: OrderedDict[tuple[str, str, bytes], Region] = OrderedDict()
        self._layers: dict[str, MergeTarget] = {}
        self.nbytes = 0
        self.evictions = 0

    def targets(self, model: nn.Module, names: set[str]) -> dict[str, MergeTarget]:
        missing = names - self._layers.keys()
        if missing:
            self._layers.update(merge_targets(model, missing))
        return {name: self._layers[name] for name in names if name in self._layers}

    def original(self, name: str, weight: torch.Tensor, variant: Variant, indices: torch.Tensor) -> Region:
        """The region of `indices` (as stored, on the host: its bytes are the key, read without a device
        round trip)."""
        key = (name, variant.name, indices.cpu().numpy().tobytes())
        region = self._regions.get(key)
        if region is not None:
            self._regions.move_to_end(key)
            return region
        on_device = indices.to(weight.device)
        region = self._regions[key] = Region(on_device, variant.take_region(weight, on_device))
        self.nbytes += region.nbytes
        while self.nbytes > self.capacity_bytes and len(self._regions) > 1:
            _, evicted = self._regions.popitem(last=False)  # a merge handle keeps its own references
            self.nbytes -= evicted.nbytes
            self.evictions += 1
        return region

    def __len__(self) -> int:
        return len(self._regions)

    def clear(self) -> None:
        self._regions.clear()
        self._layers.clear()
        self.nbytes = 0


@dataclass(frozen=True)
class Region:
    """An index set on the weight's device and the base values there."""

    indices: torch.Tensor
    original: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.original))


@dataclass(frozen=True)
class MergeTarget:
    """A layer a merge may write: its weight matrix, its (d_out, d_in), and why it may not, if so."""

    weight: torch.Tensor
    shape: tuple[int, int]
    refusal: str | None


def merge_targets(model: nn.Module, names: set[str]) -> dict[str, MergeTarget]:
    targets = {}
    for name, layer in linear_modules(model, names).items():
        weight = weight_matrix(layer)
        refusal = None
        if not weight.is_floating_point() or is_quantized_linear(layer):
            refusal = f"{name}: cannot merge into a quantised weight; load the base in full precision"
        targets[name] = MergeTarget(weight, shape_of(layer), refusal)
    return targets


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
    names = {name for adapter in adapters for name in adapter.modules}
    targets = regions.targets(model, names) if regions is not None else merge_targets(model, names)
    planned: list[tuple[torch.Tensor, ModuleDelta, torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
    for adapter in adapters:
        for name, delta in adapter.modules.items():
            target = targets.get(name)
            if target is None or target.shape != delta.shape:
                raise ValueError(f"{name}: the model has no linear module of shape {delta.shape}")
            if target.refusal is not None:
                raise ValueError(target.refusal)
            weight = target.weight
            indices: torch.Tensor | None
            if delta.variant.sparse:  # checked once per factor; the write is then a single kernel
                check_factor(delta.sbora_factor, delta.scaling, weight.dtype, name)
                factor = delta.sbora_factor
                if regions is not None:
                    region = regions.original(name, weight, delta.variant, delta.indices)  # type: ignore[arg-type]
                    indices, original = region.indices, region.original
                else:
                    indices = delta.indices.to(weight.device)  # type: ignore[union-attr]
                    original = delta.variant.take_region(weight, indices)
            else:
                indices = None
                original = delta.variant.take_region(weight, None)
                factor = delta.variant.merged_region(original, delta.scaling, delta.A, delta.B, name)
            planned.append((weight, delta, indices, original, factor))
    handle = MergeHandle()
    for weight, delta, indices, original, factor in planned:
        if delta.variant.sparse:
            assert indices is not None  # every SBoRA delta has its index set
            delta.variant.add_to_region(weight, indices, original, factor, delta.scaling)
        else:
            delta.variant.put_region(weight, indices, factor)  # LoRA: the merged region, computed above
        handle.saved.append((weight, delta.variant, indices, original))
    return handle


def export_merged(base_model: str, adapters: list[SparseAdapter], directory: str | Path) -> Path:
    """A full-precision model directory with the adapters merged in.

    QSBoRA adapters were trained on a 4-bit base; their merge goes into the
    dequantised (original full-precision) weights.
    """
    base = load_base_model(base_model, quantization="none", device="cpu")
    for adapter in adapters:
        check_compatible(adapter, base.model, base.fingerprint)
    merge_adapters(base.model, adapters)
    directory = Path(directory)
    base.model.save_pretrained(directory)
    base.tokenizer.save_pretrained(directory)
    return directory
