"""Sparse adapter files, loading with compatibility checks, and PEFT export.

An adapter directory holds two files:
- `adapter_config.json`: format tag and version, the SBoRAConfig (the base
  model's fingerprint included), the shape of every adapted layer, metadata
  (training metrics and the like);
- `adapter_model.safetensors`: per module `<module>.indices` (int32, the index
  set; SBoRA only) and the trained factor(s) `<module>.A` / `<module>.B`.

Files are written under temporary names and renamed, so a reader never sees a
half-written adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sbora_core.method.adapter import ModuleDelta, SparseAdapter
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.files import atomic_write
from sbora_core.method.inject import inject_adapter, linear_modules
from sbora_core.method.linear import shape_of

FORMAT = "sbora-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFormatError(ValueError):
    """The files are not a readable sparse adapter."""


class AdapterMismatchError(ValueError):
    """The adapter does not belong to this base model (fingerprint or a layer shape differs)."""


def save_adapter(adapter: SparseAdapter, directory: str | Path) -> Path:
    """Write the adapter's two files into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, delta in sorted(adapter.modules.items()):
        shapes[name] = list(delta.shape)
        if delta.indices is not None:
            tensors[f"{name}.indices"] = delta.indices.to(torch.int32).contiguous()
        for key, value in delta.factors().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **adapter.config.to_dict(),
        "modules": shapes,
        "metadata": adapter.metadata,
    }
    # Weights first: a config file present means the weights are complete.
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return directory


def load_adapter(directory: str | Path) -> SparseAdapter:
    """Read an adapter directory; AdapterFormatError says what is wrong with it."""
    directory = Path(directory)
    try:
        raw = json.loads((directory / CONFIG_FILE).read_text())
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{directory}: no {CONFIG_FILE}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{CONFIG_FILE}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise AdapterFormatError(f"{CONFIG_FILE}: not a sparse adapter (format must be {FORMAT!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{CONFIG_FILE}: format_version {raw.get('format_version')} is not supported")
    try:
        config = SBoRAConfig.from_dict(raw)
    except ValueError as exc:
        raise AdapterFormatError(f"{CONFIG_FILE}: {exc}") from exc
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{directory}: no {WEIGHTS_FILE}") from exc
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise AdapterFormatError(f"{WEIGHTS_FILE}: unreadable ({exc})") from exc

    modules: dict[str, ModuleDelta] = {}
    for name, shape in raw.get("modules", {}).items():
        d_out, d_in = (int(s) for s in shape)
        indices = tensors.get(f"{name}.indices")
        delta = ModuleDelta(
            variant=config.kind,
            scaling=config.scaling,
            shape=(d_out, d_in),
            indices=None if indices is None else indices.to(torch.long),
            A=tensors.get(f"{name}.A"),
            B=tensors.get(f"{name}.B"),
        )
        _check_delta(name, delta, config)
        modules[name] = delta
    if not modules:
        raise AdapterFormatError(f"{CONFIG_FILE}: lists no modules")
    return SparseAdapter(config=config, modules=modules, metadata=raw.get("metadata") or {})


def _check_delta(name: str, delta: ModuleDelta, config: SBoRAConfig) -> None:
    d_out, d_in, r = delta.shape[0], delta.shape[1], config.r
    variant = delta.variant
    expected = variant.factor_shapes(d_out, d_in, r)
    found = {k: tuple(v.shape) for k, v in delta.factors().items()}
    if found != expected:
        raise AdapterFormatError(f"{name}: factor shapes {found}, expected {expected}")
    if variant.sparse:
        if delta.indices is None or tuple(delta.indices.shape) != (r,):
            raise AdapterFormatError(f"{name}: index set missing or not of length r={r}")
        limit = variant.selection_dim(d_out, d_in)
        if int(delta.indices.min()) < 0 or int(delta.indices.max()) >= limit:
            raise AdapterFormatError(f"{name}: index set out of range [0, {limit})")
        if delta.indices.unique().numel() != r:
            raise AdapterFormatError(f"{name}: index set has repeated indices")


def check_compatible(adapter: SparseAdapter, model: nn.Module, fingerprint: str | None) -> None:
    """AdapterMismatchError naming the first difference between adapter and model."""
    if adapter.fingerprint != fingerprint:
        raise AdapterMismatchError(
            f"base_model: the adapter was trained on base model {adapter.fingerprint}, "
            f"this model is {fingerprint}"
        )
    linears = linear_modules(model)
    for name, delta in sorted(adapter.modules.items()):
        layer = linears.get(name)
        if layer is None:
            raise AdapterMismatchError(f"{name}: the base model has no such linear module")
        shape = shape_of(layer)
        if shape != delta.shape:
            raise AdapterMismatchError(f"{name}: adapter expects shape {delta.shape}, the model has {shape}")


def apply_adapter(
    model: nn.Module, adapter: SparseAdapter, fingerprint: str | None, *, fast_path: bool = True
) -> None:
    """Inject `adapter` into `model` with its stored index sets and factors.

    `fingerprint` is the base model's; a mismatch raises, never serves the base model.
    """
    check_compatible(adapter, model, fingerprint)
    config = SBoRAConfig.from_dict({**adapter.config.to_dict(), "target_modules": sorted(adapter.modules)})
    indices = {n: d.indices for n, d in adapter.modules.items() if d.indices is not None}
    layers = inject_adapter(model, config, fast_path=False, indices=indices or None)
    for name, layer in layers.items():
        layer.load_delta(adapter.modules[name])
    if fast_path:
        for layer in layers.values():
            if layer.mergeable_for_training:
                layer.merge()


def export_peft(adapter: SparseAdapter, directory: str | Path, base_model_name_or_path: str = "") -> Path:
    """Write the adapter in PEFT's LoRA layout: the fixed factor becomes a dense one-hot matrix.

    FA: lora_A = E_I^T (row k is e_{I_k}), lora_B = B. FB: lora_A = A,
    lora_B = E_J (column k is e_{J_k}). PEFT's scaling is lora_alpha / r, as here.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, delta in sorted(adapter.modules.items()):
        lora_a, lora_b = delta.variant.peft_factors(delta)
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = lora_a.float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = lora_b.float().contiguous()
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": adapter.config.r,
        "lora_alpha": adapter.config.alpha,
        "lora_dropout": adapter.config.dropout,
        "target_modules": sorted({n.split(".")[-1] for n in adapter.modules}),
        "bias": "none",
        "fan_in_fan_out": bool(adapter.metadata.get("fan_in_fan_out")),  # GPT-2's Conv1D layers
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
    return directory
