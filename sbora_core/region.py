"""The region of a weight matrix that an adapter changes, and how to change it.

SBoRA-FA changes the r columns I of W (shape (d_out, d_in)), SBoRA-FB the r rows
J, LoRA the whole matrix. These helpers read and write exactly that region, in
place, so that merging costs O(d_out * r) or O(r * d_in) and unmerging can
restore the saved region bit for bit. Merges run once per adapter switch for
every adapted layer, so each helper is a handful of kernels at most.
"""

from __future__ import annotations

import math

import torch


def take_region(weight: torch.Tensor, variant: str, indices: torch.Tensor | None) -> torch.Tensor:
    """A copy of the region of `weight` that `variant` changes."""
    if variant == "sbora_fa":
        return weight.index_select(1, indices)  # (d_out, r)
    if variant == "sbora_fb":
        return weight.index_select(0, indices)  # (r, d_in)
    return weight.detach().clone()  # (d_out, d_in)


def put_region(weight: torch.Tensor, variant: str, indices: torch.Tensor | None, values: torch.Tensor) -> None:
    """Write `values` into the region of `weight`, in place (`weight` is a `.data` tensor: no autograd)."""
    if variant == "sbora_fa":
        # scatter_ along dim 1 is markedly faster on CPU than index_copy_ for strided columns.
        weight.scatter_(1, indices.expand(weight.shape[0], -1), values)
    elif variant == "sbora_fb":
        weight.index_copy_(0, indices, values)
    else:
        weight.copy_(values)


def region_delta(
    variant: str, scaling: float, A: torch.Tensor | None, B: torch.Tensor | None
) -> torch.Tensor:
    """The change to the region: FA (alpha/r)·B, FB (alpha/r)·A, LoRA (alpha/r)·B·A."""
    if variant == "sbora_fa":
        assert B is not None
        return B * scaling  # (d_out, r)
    if variant == "sbora_fb":
        assert A is not None
        return A * scaling  # (r, d_in)
    assert A is not None and B is not None
    return (B @ A) * scaling  # (d_out, d_in)


def merged_region(
    original: torch.Tensor,
    variant: str,
    scaling: float,
    A: torch.Tensor | None,
    B: torch.Tensor | None,
    where: str,
) -> torch.Tensor:
    """original + region delta in the weight's dtype, refusing non-finite results.

    Checked before anything is written, so a diverged adapter can never leave
    NaN or inf in a live weight.
    """
    like = {"dtype": original.dtype, "device": original.device}
    if variant == "lora":
        assert A is not None and B is not None
        new = torch.addmm(original, B.detach().to(**like), A.detach().to(**like), alpha=scaling)
    else:
        factor = B if variant == "sbora_fa" else A
        assert factor is not None
        new = torch.add(original, factor.detach().to(**like), alpha=scaling)
    # One reduction: the sum is finite only if every element is (inf/NaN propagate);
    # an overflowing sum of finite values falls back to the exact check.
    if not math.isfinite(float(new.sum())) and not bool(torch.isfinite(new).all()):
        raise ValueError(f"{where}: merging would write non-finite values (the adapter factor holds NaN/inf)")
    return new


def check_factor(factor: torch.Tensor, scaling: float, dtype: torch.dtype, where: str) -> None:
    """Refuse a factor whose merge could write non-finite values into a weight of `dtype`.

    Checking the factor rather than the merged region lets the merge write in one
    kernel; the verdict is kept on the tensor until its version counter moves, so
    swapping a loaded adapter in and out again skips this pass.
    """
    key = (factor._version, dtype)
    if getattr(factor, "_sbora_checked", None) == key:
        return
    peak = float(factor.detach().abs().max()) * abs(scaling)
    # Half the dtype's range leaves the other half to the base weight; NaN fails the comparison.
    if not peak < torch.finfo(dtype).max / 2:
        raise ValueError(f"{where}: merging would write non-finite values (the adapter factor holds NaN/inf "
                         f"or values too large for {dtype})")
    factor._sbora_checked = key  # type: ignore[attr-defined]


def add_to_region(weight: torch.Tensor, variant: str, indices: torch.Tensor, original: torch.Tensor,
                  factor: torch.Tensor, scaling: float) -> None:
    """Write `original + scaling * factor` into an SBoRA region (factor already checked)."""
    factor = factor.detach().to(dtype=weight.dtype, device=weight.device)
    if variant == "sbora_fb":
        # The rows hold `original` now: one accumulate is cheaper than building the sum and copying it.
        weight.index_add_(0, indices, factor, alpha=scaling)
    else:
        put_region(weight, variant, indices, torch.add(original, factor, alpha=scaling))
