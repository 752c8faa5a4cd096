"""Row banks: slot i applies the i-th row's adapters, exactly, as rows join, leave and move."""

from __future__ import annotations

import pytest
import torch

from sbora_core.method.models import load_base_model
from sbora_core.serving.row_adapters import RowAdapterHooks, RowBanks
from sbora_core.testing import build_tiny_model, random_adapter


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base_model(str(build_tiny_model(tmp_path_factory.mktemp("banks") / "tiny")), device="cpu")


def expected_update(adapters, name, x, d_out):
    """x (T, d_in) through the sum of these adapters' dense updates of layer `name`."""
    out = torch.zeros(x.shape[0], d_out)
    for adapter in adapters:
        delta = adapter.modules.get(name)
        if delta is not None:
            out = out + x @ delta.dense_delta().T
    return out


def check(banks, rows, shapes, start=0):
    count = len(rows) - start
    views = banks.views(start, count)
    for name, (d_out, d_in) in shapes.items():
        x = torch.randn(count, 3, d_in)
        out = torch.zeros(count, 3, d_out)
        for bank in views.get(name, []):
            out = bank.apply(x, out)
        for i, (_, adapters) in enumerate(rows[start:]):
            torch.testing.assert_close(out[i], expected_update(adapters, name, x[i], d_out),
                                       msg=lambda m, i=i, name=name: f"slot {start + i}, layer {name}: {m}")


def test_slots_follow_rows_as_they_join_leave_and_move_and_a_narrower_row_leaves_no_trace(base):
    fa8 = random_adapter(base, "sbora_fa", r=8, index_seed=1, seed=1)
    fa4 = random_adapter(base, "sbora_fa", r=4, index_seed=2, seed=2)
    fb = random_adapter(base, "sbora_fb", r=8, index_seed=3, seed=3)
    lora = random_adapter(base, "lora", r=4, seed=4)
    shapes = RowAdapterHooks(base.model).shapes()
    banks = RowBanks(shapes, capacity=4, device=torch.device("cpu"))
    a, b, c, d, e = (object() for _ in range(5))

    rows = [(b, [fb]), (c, []), (a, [fa8, fa4])]  # a composes two FA adapters: 12 columns wide
    banks.arrange(rows)
    check(banks, rows, shapes)
    assert banks.copied_rows == 3

    rows = [(b, [fb]), (c, []), (a, [fa8, fa4]), (d, [lora])]  # one row joins: only it is copied
    banks.arrange(rows)
    check(banks, rows, shapes)
    assert banks.copied_rows == 4

    rows = [(b, [fb]), (d, [lora])]  # c and a finish: d moves up, nothing is copied from an adapter
    banks.arrange(rows)
    check(banks, rows, shapes)
    assert banks.copied_rows == 4

    rows = [(b, [fb]), (d, [lora]), (e, [fa4])]  # e takes the slot that held a's wider composition
    banks.arrange(rows)
    check(banks, rows, shapes)
    check(banks, rows, shapes, start=2)  # as a prefill beside the running rows uses it
    assert banks.copied_rows == 5

def test_more_rows_than_slots_is_refused(base):
    banks = RowBanks(RowAdapterHooks(base.model).shapes(), capacity=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="2 rows in flight"):
        banks.arrange([(object(), []), (object(), [])])
