"""What users of the library import keeps importing: the top-level names and the flat paths of
the README's library example from before sbora_core was split into method/, training/, serving/."""

from __future__ import annotations

import importlib

import pytest

import sbora_core

# old path -> its module now, with the names the README's library example imported from it
MOVED = {
    "sbora_core.models": ("sbora_core.method.models", ["load_base_model"]),
    "sbora_core.config": ("sbora_core.method.config", ["SBoRAConfig", "ConfigError"]),
    "sbora_core.inject": ("sbora_core.method.inject", ["inject_adapter", "adapter_from_model"]),
    "sbora_core.adapter_io": ("sbora_core.method.adapter_io",
                              ["save_adapter", "load_adapter", "apply_adapter", "export_peft"]),
    "sbora_core.merge": ("sbora_core.method.merge", ["merge_adapters"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_the_flat_paths_of_the_library_example_still_import(old):
    new, names = MOVED[old]
    before, now = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(before, name) is getattr(now, name), f"{old}.{name}"


def test_the_top_level_names():
    from sbora_core.method.adapter import ModuleDelta, SparseAdapter
    from sbora_core.method.config import SBoRAConfig

    assert (sbora_core.ModuleDelta, sbora_core.SparseAdapter, sbora_core.SBoRAConfig) == \
        (ModuleDelta, SparseAdapter, SBoRAConfig)
    assert set(sbora_core.__all__) == {"ModuleDelta", "SBoRAConfig", "SparseAdapter"}
