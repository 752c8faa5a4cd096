"""Adapter layers: SBoRA-FA, SBoRA-FB and the LoRA baseline around a frozen base layer.

`SBoRALinear` wraps (never subclasses) a base linear layer: `torch.nn.Linear`,
or bitsandbytes `Linear4bit` / `Linear8bitLt` for QSBoRA. Adapter tensors are
named `sbora_*` so that freezing, saving and loading can filter by name.

Two ways to compute the same function:
- unmerged: `y = W0 x + (alpha/r) B x[I]` (FA) or `y = W0 x; y[J] += (alpha/r) A x` (FB).
  Works on every base, quantised ones included.
- merged ("fast path", full-precision bases only): the r columns (FA) or rows
  (FB) of the live weight hold `W0 + (alpha/r) * factor`, so the forward is one
  ordinary matmul. A custom autograd function gives the factor its gradient
  while saving only `x[..., I]` (FA). The region is rewritten lazily, on the
  first forward after the factor changed, and the original region is kept so
  that unmerge is bit-exact. "Changed" is decided by comparing with a snapshot
  of the factor: fused optimisers update parameters without bumping their
  version counters, so those cannot be trusted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sbora_core.adapter import ModuleDelta
from sbora_core.region import merged_region, put_region, take_region


def _bnb_linear_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, _bnb_linear_types())


def is_adaptable_linear(module: nn.Module) -> bool:
    """Linear layers an adapter can wrap (bitsandbytes layers subclass nn.Linear)."""
    return isinstance(module, nn.Linear)


class _FusedColumns(torch.autograd.Function):
    """FA on a merged weight: y = x W^T (+ b), grad_B = (alpha/r) gy^T x[..., I]."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x, weight, bias, factor, indices, scaling):  # type: ignore[override]
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        x_sel = x.index_select(-1, indices) if ctx.needs_input_grad[3] else None  # (..., r)
        ctx.save_for_backward(x_sel, weight)
        ctx.scaling = scaling
        ctx.factor_dtype = factor.dtype
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, gy):  # type: ignore[override]
        x_sel, weight = ctx.saved_tensors
        gx = gB = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(weight.to(gy.dtype))  # (..., d_in)
        if ctx.needs_input_grad[3]:
            gy2 = gy.reshape(-1, gy.shape[-1])  # (N, d_out)
            xs2 = x_sel.reshape(-1, x_sel.shape[-1]).to(gy.dtype)  # (N, r)
            gB = (gy2.t().matmul(xs2) * ctx.scaling).to(ctx.factor_dtype)  # (d_out, r)
        return gx, None, None, gB, None, None


class _FusedRows(torch.autograd.Function):
    """FB on a merged weight: y = x W^T (+ b), grad_A = (alpha/r) gy[..., J]^T x."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x, weight, bias, factor, indices, scaling):  # type: ignore[override]
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, weight, indices)
        ctx.scaling = scaling
        ctx.factor_dtype = factor.dtype
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, gy):  # type: ignore[override]
        x, weight, indices = ctx.saved_tensors
        gx = gA = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(weight.to(gy.dtype))  # (..., d_in)
        if ctx.needs_input_grad[3]:
            gy_sel = gy.index_select(-1, indices).reshape(-1, indices.numel())  # (N, r)
            x2 = x.reshape(-1, x.shape[-1]).to(gy.dtype)  # (N, d_in)
            gA = (gy_sel.t().matmul(x2) * ctx.scaling).to(ctx.factor_dtype)  # (r, d_in)
        return gx, None, None, gA, None, None


class SBoRALinear(nn.Module):
    """A frozen base linear layer plus one adapter (SBoRA-FA, SBoRA-FB or LoRA)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        variant: str,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        indices: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.variant = variant
        self.r = r
        self.scaling = alpha / r
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.quantized = is_quantized_linear(base_layer)
        self.sbora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = dropout
        for p in base_layer.parameters():
            p.requires_grad_(False)

        device = self._weight_device()
        d_out, d_in = self.out_features, self.in_features
        self.sbora_A: nn.Parameter | None = None
        self.sbora_B: nn.Parameter | None = None
        if variant == "lora":
            self.sbora_A = nn.Parameter(torch.empty(r, d_in, device=device))
            self.sbora_B = nn.Parameter(torch.zeros(d_out, r, device=device))
            nn.init.kaiming_uniform_(self.sbora_A, a=math.sqrt(5))  # as PEFT's LoRA
            self.sbora_indices = None
        else:
            if indices is None or indices.numel() != r:
                raise ValueError(f"r: {variant} needs exactly r={r} indices")
            # The fixed factor is a set of standard-basis vectors, stored as integers.
            self.register_buffer("sbora_indices", indices.to(device=device, dtype=torch.long))
            if variant == "sbora_fa":
                self.sbora_B = nn.Parameter(torch.zeros(d_out, r, device=device))  # zero init: ΔW = 0
            else:
                self.sbora_A = nn.Parameter(torch.zeros(r, d_in, device=device))
        # Set while the live weight holds the adapter: the original region, for a bit-exact unmerge.
        self._original_region: torch.Tensor | None = None
        self._merged_factors: list[torch.Tensor] = []  # factor values the merged region was built from

    # -- helpers -----------------------------------------------------------------
    def _weight_device(self) -> torch.device:
        return self.base_layer.weight.device

    @property
    def trainable(self) -> nn.Parameter:
        """The factor SBoRA trains (FA: B, FB: A). LoRA trains both; this returns B."""
        factor = self.sbora_A if self.variant == "sbora_fb" else self.sbora_B
        assert factor is not None
        return factor

    def _factors(self) -> list[torch.Tensor]:
        return [p for p in (self.sbora_A, self.sbora_B) if p is not None]

    def _remember_factors(self) -> None:
        self._merged_factors = [p.detach().clone() for p in self._factors()]

    def _factors_changed(self) -> bool:
        return any(not torch.equal(p, s) for p, s in zip(self._factors(), self._merged_factors, strict=True))

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
                "or export a full-precision merged model (adapter_io.export_merged)"
            )
        weight = self.base_layer.weight.data
        original = take_region(weight, self.variant, self.sbora_indices)
        new = merged_region(original, self.variant, self.scaling, self.sbora_A, self.sbora_B, "merge")
        put_region(weight, self.variant, self.sbora_indices, new)
        self._original_region = original
        self._remember_factors()

    def unmerge(self) -> None:
        """Restore the original region bit for bit."""
        if self._original_region is None:
            return
        put_region(self.base_layer.weight.data, self.variant, self.sbora_indices, self._original_region)
        self._original_region = None
        self._merged_factors = []

    def _sync_region(self, force: bool = False) -> None:
        # The factor changed since the region was written (an optimiser step): rewrite it.
        if not force and not self._factors_changed():
            return
        assert self._original_region is not None
        new = merged_region(
            self._original_region, self.variant, self.scaling, self.sbora_A, self.sbora_B, "training step"
        )
        put_region(self.base_layer.weight.data, self.variant, self.sbora_indices, new)
        self._remember_factors()

    # -- forward -------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self._forward_merged(x)
        return self._forward_unmerged(x)

    def _forward_unmerged(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.variant == "sbora_fa":
            assert self.sbora_B is not None
            # Select first, then drop out: the same distribution as dropout(x)[..., I], r/d_in of the work.
            x_sel = self.sbora_dropout(x.index_select(-1, self.sbora_indices))  # (..., r)
            return y + self.scaling * F.linear(x_sel.to(self.sbora_B.dtype), self.sbora_B).to(y.dtype)
        xd = self.sbora_dropout(x)
        if self.variant == "sbora_fb":
            assert self.sbora_A is not None
            ax = self.scaling * F.linear(xd.to(self.sbora_A.dtype), self.sbora_A)  # (..., r)
            return y.index_add(-1, self.sbora_indices, ax.to(y.dtype))
        assert self.sbora_A is not None and self.sbora_B is not None
        ax = F.linear(xd.to(self.sbora_A.dtype), self.sbora_A)  # (..., r)
        return y + self.scaling * F.linear(ax, self.sbora_B).to(y.dtype)

    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_region()
        needs_factor_grad = (
            torch.is_grad_enabled() and self.variant != "lora" and self.trainable.requires_grad
        )
        if not needs_factor_grad:
            return self.base_layer(x)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        fused = _FusedColumns if self.variant == "sbora_fa" else _FusedRows
        y = fused.apply(x, weight, bias, self.trainable, self.sbora_indices, self.scaling)
        if self.training and self.dropout_p > 0:
            y = y + self._dropout_correction(x)
        return y

    def _dropout_correction(self, x: torch.Tensor) -> torch.Tensor:
        """Merged forward used x on the adapter path; swap in dropout(x) for it."""
        if self.variant == "sbora_fa":
            x_sel = x.index_select(-1, self.sbora_indices)  # (..., r)
            diff = self.sbora_dropout(x_sel) - x_sel
            return self.scaling * F.linear(diff.to(self.trainable.dtype), self.trainable).to(x.dtype)
        diff = self.sbora_dropout(x) - x  # (..., d_in)
        ax = self.scaling * F.linear(diff.to(self.trainable.dtype), self.trainable)  # (..., r)
        zeros = x.new_zeros(*x.shape[:-1], self.out_features)
        return zeros.index_add(-1, self.sbora_indices, ax.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, r={self.r}, scaling={self.scaling:g}, "
            f"in={self.in_features}, out={self.out_features}, merged={self.merged}"
        )
