"""The adapter variants as objects: SBoRA-FA, SBoRA-FB and the LoRA baseline.

Everything that differs between variants lives here, one class each (after
PEFT's `LoraVariant`): which dimension the index set selects from, the
factor shapes, the region of W an update changes and how it is read and
written, the update itself, the unmerged and fused forwards, the PEFT export,
the per-row banks of a mixed batch and the update map's norms. The rest of the
package asks a `Variant` instead of comparing names, so a new variant is one
class added here.

Shapes: W is (d_out, d_in). FA trains B (d_out, r) on the fixed columns I;
FB trains A (r, d_in) on the fixed rows J; LoRA trains A (r, d_in) and
B (d_out, r). `scaling` is alpha / r.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sbora_core.method.linear import is_conv1d, weight_for_forward

Tensor = torch.Tensor


class StoredDelta(Protocol):
    """What a variant reads from one layer's stored update: `adapter.ModuleDelta` is one.

    The variant owns the arithmetic and the adapter owns the data; the adapter module imports this
    one (a delta holds its variant), so this one names the fields it reads instead of importing it.
    """

    @property
    def scaling(self) -> float: ...

    @property
    def shape(self) -> tuple[int, int]: ...  # (d_out, d_in) of the base layer

    @property
    def indices(self) -> Tensor | None: ...  # (r,) int64; None for LoRA

    @property
    def A(self) -> Tensor | None: ...  # (r, d_in)

    @property
    def B(self) -> Tensor | None: ...  # (d_out, r)

    @property
    def r(self) -> int: ...

    def delta(self) -> Tensor: ...


# -- merge safety (every variant) -----------------------------------------------------------------
def refuse_non_finite(new: Tensor, where: str) -> Tensor:
    """`new` unchanged, or ValueError when it holds NaN/inf (checked before anything is written)."""
    # One reduction: the sum is finite only if every element is (inf/NaN propagate);
    # an overflowing sum of finite values falls back to the exact check.
    if not math.isfinite(float(new.sum())) and not bool(torch.isfinite(new).all()):
        raise ValueError(f"{where}: merging would write non-finite values (the adapter factor holds NaN/inf)")
    return new


def check_factor(factor: Tensor, scaling: float, dtype: torch.dtype, where: str) -> None:
    """Refuse a factor whose merge could write non-finite values into a weight of `dtype`.

    Checking the factor rather than the merged region lets the merge write in one
    kernel. The factor's peak is read once (a device-to-host sync) and kept on the
    tensor until its version counter moves: swapping a loaded adapter in and out
    again, at any scaling, reads nothing.
    """
    version, peak = getattr(factor, "_sbora_peak", (None, 0.0))
    if version != factor._version:
        peak = float(factor.detach().abs().max())
        factor._sbora_peak = (factor._version, peak)  # type: ignore[attr-defined]
    # Half the dtype's range leaves the other half to the base weight; NaN fails the comparison.
    if not peak * abs(scaling) < torch.finfo(dtype).max / 2:
        raise ValueError(f"{where}: merging would write non-finite values (the adapter factor holds NaN/inf "
                         f"or values too large for {dtype})")


# -- fused autograd functions for the merged training path ----------------------------------------
class _FusedColumns(torch.autograd.Function):
    """FA on a merged weight: y = x W^T (+ b), grad_B = (alpha/r) gy^T x[..., I]."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x, weight, bias, factor, indices, scaling):
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        x_sel = x.index_select(-1, indices) if ctx.needs_input_grad[3] else None  # (..., r)
        ctx.save_for_backward(x_sel, weight)
        ctx.scaling = scaling
        ctx.factor_dtype = factor.dtype
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, gy):
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
    def forward(ctx: Any, x, weight, bias, factor, indices, scaling):
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, weight, indices)
        ctx.scaling = scaling
        ctx.factor_dtype = factor.dtype
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, gy):
        x, weight, indices = ctx.saved_tensors
        gx = gA = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(weight.to(gy.dtype))  # (..., d_in)
        if ctx.needs_input_grad[3]:
            gy_sel = gy.index_select(-1, indices).reshape(-1, indices.numel())  # (N, r)
            x2 = x.reshape(-1, x.shape[-1]).to(gy.dtype)  # (N, d_in)
            gA = (gy_sel.t().matmul(x2) * ctx.scaling).to(ctx.factor_dtype)  # (r, d_in)
        return gx, None, None, gA, None, None


class _AddColumns(torch.autograd.Function):
    """FA unmerged on a plain linear base: y = x W^T (+ b) + (alpha/r) (keep ⊙ x[..., I]) B^T.

    Autograd would give the adapter's share of grad_x as a full-size zero tensor with r columns
    filled (the backward of index_select), then add it to the base's share: two extra passes over
    an activation per layer. Here it goes into the base's grad_x, r columns in place. `keep` is the
    dropout mask divided by (1 - p), or None.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, x, weight, bias, factor, indices, scaling, keep):
        x_sel = x.index_select(-1, indices)  # (..., r)
        if keep is not None:
            x_sel = x_sel * keep
        y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))  # (..., d_out)
        # The update joins y in one GEMM epilogue (y += s x_I B^T): no (..., d_out) temporary, no
        # separate scaling and addition passes over it.
        y.view(-1, y.shape[-1]).addmm_(x_sel.reshape(-1, x_sel.shape[-1]).to(y.dtype), factor.to(y.dtype).t(),
                                       alpha=scaling)
        ctx.save_for_backward(x_sel, weight, factor, indices, keep)
        ctx.scaling = scaling
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, gy):
        x_sel, weight, factor, indices, keep = ctx.saved_tensors
        gx = gB = None
        if ctx.needs_input_grad[0]:
            gx = gy.matmul(weight.to(gy.dtype))  # (..., d_in)
            g_sel = gy.matmul(factor.to(gy.dtype)) * ctx.scaling  # (..., r)
            gx.index_add_(-1, indices, g_sel if keep is None else g_sel * keep)
        if ctx.needs_input_grad[3]:
            gy2 = gy.reshape(-1, gy.shape[-1])  # (N, d_out)
            xs2 = x_sel.reshape(-1, x_sel.shape[-1]).to(gy.dtype)  # (N, r)
            gB = (gy2.t().matmul(xs2) * ctx.scaling).to(factor.dtype)  # (d_out, r)
        return gx, None, None, gB, None, None, None


# -- the variants -----------------------------------------------------------------------------------
class Variant:
    """What one kind of adapter update is; subclasses fill in every method."""

    name: ClassVar[str]
    label: ClassVar[str]  # for people: "SBoRA-FA"
    region_kind: ClassVar[str]  # what of W an update changes: "columns", "rows", "the whole matrix"
    sparse: ClassVar[bool]  # an index set fixes one factor (SBoRA); False: both factors train (LoRA)
    trained: ClassVar[tuple[str, ...]]  # the factors that train: ("B",), ("A",) or ("A", "B")
    fused: ClassVar[type[torch.autograd.Function] | None] = None  # merged training path, if any

    def __repr__(self) -> str:
        return f"<variant {self.name}>"

    def selection_dim(self, d_out: int, d_in: int) -> int:
        """The size r selects from (the rank bound)."""
        raise NotImplementedError

    def factor_shapes(self, d_out: int, d_in: int, r: int) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def init_factors(self, d_out: int, d_in: int, r: int, device: torch.device) -> dict[str, Tensor]:
        """Fresh factors whose update is zero."""
        raise NotImplementedError

    def trained_factor(self, A: Tensor | None, B: Tensor | None) -> Tensor:
        """The one factor an SBoRA variant trains (LoRA: B)."""
        factor = A if self.trained == ("A",) else B
        assert factor is not None
        return factor

    # Regions of W --------------------------------------------------------------------------------
    def take_region(self, weight: Tensor, indices: Tensor | None) -> Tensor:
        """A copy of the region of `weight` this variant changes."""
        raise NotImplementedError

    def put_region(self, weight: Tensor, indices: Tensor | None, values: Tensor) -> None:
        """Write `values` into the region of `weight`, in place (`weight` is a `.data` tensor)."""
        raise NotImplementedError

    def delta(self, scaling: float, A: Tensor | None, B: Tensor | None) -> Tensor:
        """The region's change: FA (alpha/r)·B, FB (alpha/r)·A, LoRA (alpha/r)·B·A."""
        raise NotImplementedError

    def merged_region(self, original: Tensor, scaling: float, A: Tensor | None, B: Tensor | None,
                      where: str, check: bool = True) -> Tensor:
        """original + the region's change, in the weight's dtype, refusing non-finite results.

        `check=False` skips the finiteness check, a read back to the host: the training loop
        rewrites regions after every step and checks the loss once per step instead."""
        factor = self.trained_factor(A, B).detach().to(dtype=original.dtype, device=original.device)
        new = torch.add(original, factor, alpha=scaling)
        return refuse_non_finite(new, where) if check else new

    def add_to_region(self, weight: Tensor, indices: Tensor, original: Tensor, factor: Tensor,
                      scaling: float) -> None:
        """Write `original + scaling * factor` into the region (factor already checked)."""
        factor = factor.detach().to(dtype=weight.dtype, device=weight.device)
        self.put_region(weight, indices, torch.add(original, factor, alpha=scaling))

    # Forwards ------------------------------------------------------------------------------------
    def forward_unmerged(self, base: nn.Module, x: Tensor, indices: Tensor | None, A: Tensor | None,
                         B: Tensor | None, scaling: float, dropout: nn.Module) -> Tensor:
        """base(x) plus this variant's update of x, with dropout on the adapter's input."""
        raise NotImplementedError

    def dropout_correction(self, x: Tensor, indices: Tensor, factor: Tensor, scaling: float, dropout: Any,
                           d_out: int) -> Tensor:
        """The merged forward used x on the adapter path; this swaps in dropout(x) for it."""
        raise NotImplementedError

    # Export and analysis -------------------------------------------------------------------------
    def peft_factors(self, delta: StoredDelta) -> tuple[Tensor, Tensor]:
        """(lora_A, lora_B) in PEFT's layout; the fixed factor becomes a dense one-hot matrix."""
        raise NotImplementedError

    def update_norms(self, delta: StoredDelta) -> tuple[str, int, Tensor, Tensor]:
        """(axis, dimension, changed indices, L2 norm of each changed column/row of the update)."""
        raise NotImplementedError

    # Per-row banks of a mixed batch -------------------------------------------------------------
    def new_bank(self, n: int, width: int, d_out: int, d_in: int, dtype: torch.dtype,
                 device: torch.device) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Zeroed (indices (n, R), A (n, R, d_in), B (n, d_out, R)) for n rows, None where unused."""
        raise NotImplementedError

    def fill_bank(self, indices: Tensor | None, A: Tensor | None, B: Tensor | None, row: int, span: slice,
                  delta: StoredDelta) -> None:
        """Copy one delta, its scaling folded in, into `span` of `row`."""
        raise NotImplementedError

    def apply_bank(self, x: Tensor, out: Tensor, indices: Tensor | None, A: Tensor | None,
                   B: Tensor | None) -> Tensor:
        """out + every row's update; x (B, T, d_in), out (B, T, d_out)."""
        raise NotImplementedError


class SBoRAFA(Variant):
    """SBoRA-FA: A is fixed to r standard-basis rows e_I; B trains; the update changes columns I."""

    name, label, region_kind, sparse, trained = "sbora_fa", "SBoRA-FA", "columns", True, ("B",)
    fused = _FusedColumns

    def selection_dim(self, d_out: int, d_in: int) -> int:
        return d_in

    def factor_shapes(self, d_out: int, d_in: int, r: int) -> dict[str, tuple[int, int]]:
        return {"B": (d_out, r)}

    def init_factors(self, d_out: int, d_in: int, r: int, device: torch.device) -> dict[str, Tensor]:
        return {"B": torch.zeros(d_out, r, device=device)}  # zero init: ΔW = 0

    def take_region(self, weight: Tensor, indices: Tensor | None) -> Tensor:
        assert indices is not None
        return weight.index_select(1, indices)  # (d_out, r)

    def put_region(self, weight: Tensor, indices: Tensor | None, values: Tensor) -> None:
        assert indices is not None
        # scatter_ along dim 1 is markedly faster on CPU than index_copy_ for strided columns.
        weight.scatter_(1, indices.expand(weight.shape[0], -1), values)

    def delta(self, scaling: float, A: Tensor | None, B: Tensor | None) -> Tensor:
        assert B is not None
        return B * scaling  # (d_out, r)

    def forward_unmerged(self, base, x, indices, A, B, scaling, dropout):
        assert B is not None and indices is not None
        # Select first, then drop out: the same distribution as dropout(x)[..., I], r/d_in of the work.
        keep = dropout(torch.ones(*x.shape[:-1], indices.numel(), dtype=x.dtype, device=x.device)) \
            if dropout.training and isinstance(dropout, nn.Dropout) else None  # (..., r) mask / (1 - p)
        if type(base) is nn.Linear or is_conv1d(base):  # a plain weight: one autograd function for both terms
            return _AddColumns.apply(x, weight_for_forward(base), base.bias, B, indices, scaling, keep)
        # A quantised base runs its own kernels; the update joins them in one addmm: y + s x_I B^T.
        x_sel = x.index_select(-1, indices)  # (..., r)
        if keep is not None:
            x_sel = x_sel * keep
        y = base(x)  # (..., d_out)
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), x_sel.reshape(-1, x_sel.shape[-1]).to(y.dtype),
                           B.to(y.dtype).t(), alpha=scaling)
        return flat.view(y.shape)

    def dropout_correction(self, x, indices, factor, scaling, dropout, d_out):
        x_sel = x.index_select(-1, indices)  # (..., r)
        diff = dropout(x_sel) - x_sel
        return scaling * F.linear(diff.to(factor.dtype), factor).to(x.dtype)

    def peft_factors(self, delta: StoredDelta) -> tuple[Tensor, Tensor]:
        assert delta.B is not None and delta.indices is not None
        lora_a = torch.zeros(delta.r, delta.shape[1])
        lora_a[torch.arange(delta.r), delta.indices] = 1.0  # row k is e_{I_k}
        return lora_a, delta.B

    def update_norms(self, delta: StoredDelta) -> tuple[str, int, Tensor, Tensor]:
        assert delta.indices is not None
        return "columns", delta.shape[1], delta.indices, delta.delta().float().norm(dim=0)  # (r,)

    def new_bank(self, n, width, d_out, d_in, dtype, device):
        return (torch.zeros(n, width, dtype=torch.long, device=device), None,
                torch.zeros(n, d_out, width, dtype=dtype, device=device))

    def fill_bank(self, indices, A, B, row, span, delta):
        assert indices is not None and B is not None and delta.B is not None
        indices[row, span] = delta.indices
        torch.mul(delta.B, delta.scaling, out=B[row, :, span])

    def apply_bank(self, x, out, indices, A, B):
        assert indices is not None and B is not None
        T = x.shape[1]
        x_sel = torch.gather(x, 2, indices[:, None, :].expand(-1, T, -1))  # (B, T, R)
        return out + torch.bmm(x_sel.to(B.dtype), B.transpose(1, 2)).to(out.dtype)  # (B, T, d_out)


class SBoRAFB(Variant):
    """SBoRA-FB: B is fixed to r standard-basis columns e_J; A trains; the update changes rows J."""

    name, label, region_kind, sparse, trained = "sbora_fb", "SBoRA-FB", "rows", True, ("A",)
    fused = _FusedRows

    def selection_dim(self, d_out: int, d_in: int) -> int:
        return d_out

    def factor_shapes(self, d_out: int, d_in: int, r: int) -> dict[str, tuple[int, int]]:
        return {"A": (r, d_in)}

    def init_factors(self, d_out: int, d_in: int, r: int, device: torch.device) -> dict[str, Tensor]:
        return {"A": torch.zeros(r, d_in, device=device)}

    def take_region(self, weight: Tensor, indices: Tensor | None) -> Tensor:
        assert indices is not None
        return weight.index_select(0, indices)  # (r, d_in)

    def put_region(self, weight: Tensor, indices: Tensor | None, values: Tensor) -> None:
        assert indices is not None
        weight[indices] = values  # index_put_: a fifth faster on CPU than index_copy_ along dim 0

    def delta(self, scaling: float, A: Tensor | None, B: Tensor | None) -> Tensor:
        assert A is not None
        return A * scaling  # (r, d_in)

    def add_to_region(self, weight, indices, original, factor, scaling):
        # The rows hold `original` now: one accumulate is cheaper than building the sum and copying it.
        weight.index_add_(0, indices, factor.detach().to(dtype=weight.dtype, device=weight.device), alpha=scaling)

    def forward_unmerged(self, base, x, indices, A, B, scaling, dropout):
        assert A is not None
        y = base(x)  # (..., d_out)
        # Under autocast the product runs in the autocast dtype whatever x's is: a cast of x to the
        # factor's fp32 would only copy every activation twice. Without autocast, fp32 as before.
        dtype = x.dtype if torch.is_autocast_enabled(x.device.type) else A.dtype
        ax = (F.linear(dropout(x).to(dtype), A.to(dtype)) * scaling).to(y.dtype)  # (..., r)
        # Linear layers keep their input for backward, not y, so y's r rows can change in place rather
        # than in a copy of y; but not a view a custom autograd function returned (bitsandbytes' int8
        # layer on CUDA), which autograd refuses to modify.
        return y.index_add(-1, indices, ax) if y._is_view() else y.index_add_(-1, indices, ax)

    def dropout_correction(self, x, indices, factor, scaling, dropout, d_out):
        diff = dropout(x) - x  # (..., d_in)
        ax = scaling * F.linear(diff.to(factor.dtype), factor)  # (..., r)
        zeros = x.new_zeros(*x.shape[:-1], d_out)
        return zeros.index_add(-1, indices, ax.to(x.dtype))

    def peft_factors(self, delta: StoredDelta) -> tuple[Tensor, Tensor]:
        assert delta.A is not None and delta.indices is not None
        lora_b = torch.zeros(delta.shape[0], delta.r)
        lora_b[delta.indices, torch.arange(delta.r)] = 1.0  # column k is e_{J_k}
        return delta.A, lora_b

    def update_norms(self, delta: StoredDelta) -> tuple[str, int, Tensor, Tensor]:
        assert delta.indices is not None
        return "rows", delta.shape[0], delta.indices, delta.delta().float().norm(dim=1)  # (r,)

    def new_bank(self, n, width, d_out, d_in, dtype, device):
        return (torch.zeros(n, width, dtype=torch.long, device=device),
                torch.zeros(n, width, d_in, dtype=dtype, device=device), None)

    def fill_bank(self, indices, A, B, row, span, delta):
        assert indices is not None and A is not None and delta.A is not None
        indices[row, span] = delta.indices
        torch.mul(delta.A, delta.scaling, out=A[row, span])

    def apply_bank(self, x, out, indices, A, B):
        assert indices is not None and A is not None
        ax = torch.bmm(x.to(A.dtype), A.transpose(1, 2)).to(out.dtype)  # (B, T, R)
        T = x.shape[1]
        return out.scatter_add(2, indices[:, None, :].expand(-1, T, -1), ax)


class LoRA(Variant):
    """The LoRA baseline: both factors train; the update changes the whole matrix."""

    name, label, region_kind, sparse, trained = "lora", "LoRA", "the whole matrix", False, ("A", "B")

    def selection_dim(self, d_out: int, d_in: int) -> int:
        return min(d_in, d_out)

    def factor_shapes(self, d_out: int, d_in: int, r: int) -> dict[str, tuple[int, int]]:
        return {"A": (r, d_in), "B": (d_out, r)}

    def init_factors(self, d_out: int, d_in: int, r: int, device: torch.device) -> dict[str, Tensor]:
        A = torch.empty(r, d_in, device=device)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as PEFT's LoRA
        return {"A": A, "B": torch.zeros(d_out, r, device=device)}

    def take_region(self, weight: Tensor, indices: Tensor | None) -> Tensor:
        return weight.detach().clone()  # (d_out, d_in)

    def put_region(self, weight: Tensor, indices: Tensor | None, values: Tensor) -> None:
        weight.copy_(values)

    def delta(self, scaling: float, A: Tensor | None, B: Tensor | None) -> Tensor:
        assert A is not None and B is not None
        return (B @ A) * scaling  # (d_out, d_in)

    def merged_region(self, original, scaling, A, B, where, check=True):
        assert A is not None and B is not None
        like = original  # the weight's dtype and device
        new = torch.addmm(original, B.detach().to(like), A.detach().to(like), alpha=scaling)
        return refuse_non_finite(new, where) if check else new

    def forward_unmerged(self, base, x, indices, A, B, scaling, dropout):
        assert A is not None and B is not None
        y = base(x)
        ax = F.linear(dropout(x).to(A.dtype), A)  # (..., r)
        return y + scaling * F.linear(ax, B).to(y.dtype)

    def peft_factors(self, delta: StoredDelta) -> tuple[Tensor, Tensor]:
        assert delta.A is not None and delta.B is not None
        return delta.A, delta.B

    def update_norms(self, delta: StoredDelta) -> tuple[str, int, Tensor, Tensor]:
        assert delta.A is not None and delta.B is not None
        # Every column changes; the norms come from the r×r Gram matrix BᵀB, never the dense product.
        A, B = delta.A.float(), delta.B.float()
        squared = (A * ((B.T @ B) @ A)).sum(dim=0).clamp_min(0)  # ||B a_j||² for each column j
        return "columns", delta.shape[1], torch.arange(delta.shape[1]), squared.sqrt() * float(delta.scaling)

    def new_bank(self, n, width, d_out, d_in, dtype, device):
        return (None, torch.zeros(n, width, d_in, dtype=dtype, device=device),
                torch.zeros(n, d_out, width, dtype=dtype, device=device))

    def fill_bank(self, indices, A, B, row, span, delta):
        assert A is not None and B is not None and delta.A is not None and delta.B is not None
        A[row, span] = delta.A
        torch.mul(delta.B, delta.scaling, out=B[row, :, span])

    def apply_bank(self, x, out, indices, A, B):
        assert A is not None and B is not None
        ax = torch.bmm(x.to(A.dtype), A.transpose(1, 2))  # (B, T, R)
        return out + torch.bmm(ax, B.transpose(1, 2)).to(out.dtype)


VARIANTS: dict[str, Variant] = {v.name: v for v in (SBoRAFA(), SBoRAFB(), LoRA())}


def get_variant(name: str | Variant) -> Variant:
    """The variant called `name` (a Variant is returned as it is); KeyError lists the known ones."""
    if isinstance(name, Variant):
        return name
    try:
        return VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}") from None
