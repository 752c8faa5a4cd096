"""The layers an adapter can wrap, whatever their class and storage: one view of each as y = W x + b.

`torch.nn.Linear` and bitsandbytes' 4-bit and 8-bit layers (which subclass it)
store W as (d_out, d_in); GPT-2's `Conv1D` stores it transposed, (d_in, d_out).
`weight_matrix` gives every one as a (d_out, d_in) view of the same storage, so
the variants' regional reads and in-place writes mean the same thing on both:
SBoRA-FA selects input features, SBoRA-FB output features.
"""

from __future__ import annotations

import sys
from typing import cast

import torch
from torch import nn


def _bnb_linear_types() -> tuple[type, ...]:
    # No layer can be bitsandbytes' before bitsandbytes is imported (loading a quantised model does);
    # importing it just to ask would cost every process ~2 s (its CPU ops import torch's compiler).
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return ()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_quantized_linear(module: nn.Module) -> bool:
    return isinstance(module, _bnb_linear_types())


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_adaptable_linear(module: nn.Module) -> bool:
    """Layers an adapter can wrap: nn.Linear (bitsandbytes' layers included) and GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def shape_of(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a linear layer, whatever its storage."""
    if is_conv1d(module):
        d_in, d_out = _weight(module).shape  # stored transposed
        return int(d_out), int(d_in)
    linear = cast(nn.Linear, module)  # a bitsandbytes layer's weight is packed: ask for its features
    return linear.out_features, linear.in_features


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's W as a (d_out, d_in) view of its weight data: in-place writes reach the layer."""
    weight = _weight(module).data
    return weight.t() if is_conv1d(module) else weight


def weight_for_forward(module: nn.Module) -> torch.Tensor:
    """W (d_out, d_in) for `F.linear`, keeping autograd's view of the parameter."""
    weight = _weight(module)
    return weight.t() if is_conv1d(module) else weight
