"""The update map's norms equal those of the dense update, for every variant."""

from __future__ import annotations

import pytest
import torch

from sbora_core.method.adapter import ModuleDelta
from sbora_core.method.update_map import module_update


def random_delta(variant: str) -> ModuleDelta:
    torch.manual_seed(0)
    d_out, d_in, r = 6, 5, 3
    indices = torch.tensor([0, 2, 4]) if variant != "lora" else None
    A = torch.randn(r, d_in) if variant != "sbora_fa" else None
    B = torch.randn(d_out, r) if variant != "sbora_fb" else None
    return ModuleDelta(variant, 0.5, (d_out, d_in), indices=indices, A=A, B=B)


@pytest.mark.parametrize("variant,axis", [("sbora_fa", "columns"), ("sbora_fb", "rows"), ("lora", "columns")])
def test_norms_are_those_of_the_dense_update(variant, axis):
    delta = random_delta(variant)
    got = module_update("layers.0.q_proj", delta)
    dense = delta.dense_delta()
    norms = dense.norm(dim=0) if axis == "columns" else dense.norm(dim=1)  # over every column / row of W
    assert got.axis == axis and got.dimension == (5 if axis == "columns" else 6)
    torch.testing.assert_close(torch.tensor(got.norms), norms[got.indices], rtol=1e-5, atol=1e-6)
    # Nothing outside the listed indices changes.
    outside = torch.ones_like(norms, dtype=torch.bool)
    outside[got.indices] = False
    assert bool((norms[outside] == 0).all())
    if variant == "lora":
        assert got.indices == list(range(5))  # LoRA changes every column
