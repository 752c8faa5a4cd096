"""Adapter layers: SBoRA-FA, SBoRA-FB and the LoRA baseline around a frozen base layer.

`SBoRALinear` wraps (never subclasses) a base linear layer: `torch.nn.Linear`,
or bitsandbytes `Linear4bit` / `Linear8bitLt` for QSBoRA. Adapter tensors are
named `sbora_*` so that freezing, saving and loading can filter by name.

Two ways to compute the same function:
- unmerged: `y = W0 x + (alpha/r) B x[I]` (FA) or `y = W0 x; y[J] += (alpha/r) A x` (FB).
  Works on every base, quantised and half-precision ones included.
- merged ("fast path", fp32 bases only): the r columns (FA) or rows (FB) of the
  live weight hold `W0 + (alpha/r) * factor`, so the forward is one ordinary
  matmul. A custom autograd function gives the factor its gradient while saving
  only `x[..., I]` (FA). The region is rewritten lazily, on the first forward
  after the factor changed, and the original region is kept so that unmerge is
  bit-exact. On a bf16 or fp16 weight the sum would round small updates away,
  so those bases keep the adapter term separate (the unmerged path).

"Changed" must be known without reading anything back from the GPU: the trainer
marks the factors stale after each optimiser step (`follow_optimizer`), and a
factor's version counter catches in-place edits made anywhere else. (Fused
optimisers update parameters without bumping version counters, so the counter
alone cannot tell.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sbora_core.method.adapter import ModuleDelta
from sbora_core.method.linear import (
    is_quantized_linear,
    shape_of,
    weight_for_forward,
    weight_matrix,
)
from sbora_core.method.variants import Variant, get_variant


def follow_optimizer(optimizer: torch.optim.Optimizer, layers: Iterable[SBoRALinear]) -> None:
    """After each step of `optimizer`, mark the layers' factors stale: merged regions are rewritten
    on their next forward. Needed for fused optimisers, which leave version counters alone."""
    layers = list(layers)

    def stepped(*_: Any) -> None:
        for layer in layers:
            layer.factors_stale = True

    optimizer.register_step_post_hook(stepped)


class SBoRALinear(nn.Module):
    """A frozen base linear layer plus one adapter (SBoRA-FA, SBoRA-FB or LoRA)."""

    def __init__(
        self,
        base_layer: nn.Module,
        variant: Variant | str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        indices: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.variant = get_variant(variant)
        self.r = r
        self.scaling = alpha / r
        self.out_features, self.in_features = shape_of(base_layer)
        self.quantized = is_quantized_linear(base_layer)
        self.sbora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = dropout
        for p in base_layer.parameters():
            p.requires_grad_(False)

        device = self._weight_device()
        self.sbora_A: nn.Parameter | None = None
        self.sbora_B: nn.Parameter | None = None
        if self.variant.sparse:
            if indices is None or indices.numel() != r:
                raise ValueError(f"r: {self.variant.name} needs exactly r={r} indices")
            # The fixed factor is a set of standard-basis vectors, stored as integers.
            self.register_buffer("sbora_indices", indices.to(device=device, dtype=torch.long))
        else:
            self.sbora_indices = None
        for name, value in self.variant.init_factors(self.out_features, self.in_features, r, device).items():
            setattr(self, f"sbora_{name}", nn.Parameter(value))
        # Set while the live weight holds the adapter: the original region, for a bit-exact unmerge.
        self._original_region: torch.Tensor | None = None
        self._merged_versions: tuple[int, ...] = ()  # factor version counters when the region was written
        self.factors_stale = False  # set by the trainer after an optimiser step

    # -- helpers -----------------------------------------------------------------
    def _weight_device(self) -> torch.device:
        return weight_matrix(self.base_layer).device

    @property
    def trainable(self) -> torch.Tensor:
        """The factor SBoRA trains (FA: B, FB: A). LoRA trains both; this returns B."""
        return self.variant.trained_factor(self.sbora_A, self.sbora_B)

    def _factors(self) -> list[torch.Tensor]:
        return [p for p in (self.sbora_A, self.sbora_B) if p is not None]

    def _remember_factors(self) -> None:
        self._merged_versions = tuple(p._version for p in self._factors())
        self.factors_stale = False

    def _factors_changed(self) -> bool:
        return self.factors_stale or tuple(p._version for p in self._factors()) != self._merged_versions

    @property
    def mergeable_for_training(self) -> bool:
        """The fast path applies: the variant has one and the weight is fp32 (not quantised, not half)."""
        return (self.variant.fused is not None and not self.quantized
                and self.base_layer.weight.dtype == torch.float32)

    def _weight(self) -> torch.Tensor:
        """The base layer's W as a (d_out, d_in) view (GPT-2's Conv1D stores it transposed)."""
        return weight_matrix(self.base_layer)

    @property
    def merged(self) -> bool:
        return self._original_region is not None

    def to_delta(self) -> ModuleDelta:
        """A detached CPU copy of this layer's adapter."""

        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to("cpu", copy=True)

        return ModuleDelta(
            variant=self.variant,
            scaling=self.scaling,
            shape=(self.out_features, self.in_features),
            indices=cpu(self.sbora_indices),
            A=cpu(self.sbora_A),
            B=cpu(self.sbora_B),
        )

    def load_delta(self, delta: ModuleDelta) -> None:
        """Copy a stored adapter's index set and factors into this layer."""
        with torch.no_grad():
            if delta.indices is not None:
                assert self.sbora_indices is not None
                self.sbora_indices.copy_(delta.indices)
            for name, value in delta.factors().items():
                getattr(self, f"sbora_{name}").copy_(value)
        if self.merged:
            self._sync_region(force=True)

    # -- merge ---------------------------------------------------------------------
    def merge(self) -> None:
        """Write the adapter into the live weight's region (in place, finite-checked)."""
        if self.merged:
            return
        if self.quantized:
            raise ValueError(
                "cannot merge into a quantised base weight; use the unmerged forward, "
                "or export a full-precision merged model (merge.export_merged)"
            )
        weight = self._weight()
        original = self.variant.take_region(weight, self.sbora_indices)
        new = self.variant.merged_region(original, self.scaling, self.sbora_A, self.sbora_B, "merge")
        self.variant.put_region(weight, self.sbora_indices, new)
        self._original_region = original
        self._remember_factors()

    def unmerge(self) -> None:
        """Restore the original region bit for bit."""
        if self._original_region is None:
            return
        self.variant.put_region(self._weight(), self.sbora_indices, self._original_region)
        self._original_region = None
        self._merged_versions = ()

    def _sync_region(self, force: bool = False) -> None:
        # The factor changed since the region was written (an optimiser step): rewrite it.
        if not force and not self._factors_changed():
            return
        assert self._original_region is not None
        # No finiteness check here (a read back to the host per layer per step): a non-finite factor
        # makes the next loss non-finite, which the trainer checks once per step.
        new = self.variant.merged_region(self._original_region, self.scaling, self.sbora_A, self.sbora_B,
                                         "training step", check=force)
        self.variant.put_region(self._weight(), self.sbora_indices, new)
        self._remember_factors()

    # -- forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._forward_merged(x)
        return self._forward_unmerged(x)

    def _forward_unmerged(self, x: torch.Tensor) -> torch.Tensor:
        return self.variant.forward_unmerged(self.base_layer, x, self.sbora_indices, self.sbora_A,
                                             self.sbora_B, self.scaling, self.sbora_dropout)

    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_region()
        fused = self.variant.fused
        if fused is None or not torch.is_grad_enabled() or not self.trainable.requires_grad:
            return self.base_layer(x)
        weight, bias = weight_for_forward(self.base_layer), self.base_layer.bias
        y = fused.apply(x, weight, bias, self.trainable, self.sbora_indices, self.scaling)
        if self.training and self.dropout_p > 0:
            assert self.sbora_indices is not None
            y = y + self.variant.dropout_correction(x, self.sbora_indices, self.trainable, self.scaling,
                                                   self.sbora_dropout, self.out_features)
        return y

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant.name}, r={self.r}, scaling={self.scaling:g}, "
            f"in={self.in_features}, out={self.out_features}, merged={self.merged}"
        )
