"""Put adapters on a transformers model and take them off again.

`inject_adapter` replaces each targeted linear layer with an `SBoRALinear`
around it, draws the index sets reproducibly from `config.index_seed`, freezes
everything but the adapter factors and, for full-precision bases, switches on
the merged fast path. `remove_adapter` puts the original layers back with
their weights restored bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sbora_core.method.adapter import SparseAdapter
from sbora_core.method.config import ALL_LINEAR, PRESETS, ConfigError, SBoRAConfig
from sbora_core.method.layers import SBoRALinear
from sbora_core.method.linear import is_adaptable_linear, is_conv1d, shape_of

# Never adapted by a preset: the output head (PEFT excludes it too).
_OUTPUT_HEADS = ("lm_head", "embed_out")
# What a layer does, by the modules it sits in or its own name, across model families.
_ATTENTION_PARTS = ("attn", "attention")
_MLP_PARTS = ("mlp", "ffn", "feed_forward")
_MLP_NAMES = ("fc1", "fc2", "c_fc", "w1", "w2", "w3", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
              "dense_h_to_4h", "dense_4h_to_h")


def layer_role(name: str) -> str | None:
    """`attention`, `mlp` or None for a linear layer's full name (LLaMA's self_attn.q_proj, GPT-2's
    attn.c_attn and mlp.c_fc, OPT's fc1, GPT-NeoX's attention.query_key_value, ...)."""
    *parents, last = name.split(".")
    if any(word in part for part in parents for word in _ATTENTION_PARTS):
        return "attention"
    if any(word in part for part in parents for word in _MLP_PARTS) or last in _MLP_NAMES:
        return "mlp"
    return None


def _adaptable(module: nn.Module) -> bool:
    return is_adaptable_linear(module) and not isinstance(module, SBoRALinear)


def linear_modules(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Every adaptable linear layer (full precision or bitsandbytes), by full name; with `names`,
    only those (looked up one by one: cheaper than walking the model on every merge)."""
    if names is None:
        return {name: module for name, module in model.named_modules() if _adaptable(module)}
    found: dict[str, nn.Module] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if _adaptable(module):
            found[name] = module
    return found


def select_targets(model: nn.Module, target_modules: list[str] | str) -> dict[str, nn.Module]:
    """The linear layers a config's `target_modules` names; ConfigError if none match."""
    linears = {
        name: m for name, m in linear_modules(model).items() if not name.endswith(".base_layer")
    }
    output_embeddings = getattr(model, "get_output_embeddings", None)
    heads = {id(output_embeddings())} if callable(output_embeddings) else set()
    bodies = {n: m for n, m in linears.items() if n.split(".")[-1] not in _OUTPUT_HEADS and id(m) not in heads}
    if target_modules == ALL_LINEAR:
        chosen = bodies
    elif isinstance(target_modules, str) and target_modules in PRESETS:
        chosen = {n: m for n, m in bodies.items() if layer_role(n) == target_modules}
        if not chosen:
            raise ConfigError("target_modules", f"this model has no {target_modules} layers that can be told apart "
                                                f"by name; name them: {sorted({n.split('.')[-1] for n in linears})}")
    else:
        def matches(name: str, wanted: str) -> bool:
            return name == wanted or name.split(".")[-1] == wanted

        chosen = {n: m for n, m in linears.items() if any(matches(n, w) for w in target_modules)}
        missing = [w for w in target_modules if not any(matches(n, w) for n in chosen)]
        if missing:
            raise ConfigError(
                "target_modules", f"{missing} match no linear module; this model's linear modules "
                f"are {sorted({n.split('.')[-1] for n in linears})}"
            )
    if not chosen:
        raise ConfigError("target_modules", "the model has no linear module to adapt")
    return chosen


def check_rank(config: SBoRAConfig, shapes: dict[str, tuple[int, int]]) -> None:
    """ConfigError naming `r` when a targeted layer is too small for the rank."""
    variant = config.kind
    for name, (d_out, d_in) in shapes.items():
        limit = variant.selection_dim(d_out, d_in)
        if config.r > limit:
            raise ConfigError(
                "r", f"rank {config.r} is larger than {limit}, the dimension {variant.name} "
                f"selects from in {name} (shape {d_out}x{d_in}); use r <= "
                f"{min(variant.selection_dim(*s) for s in shapes.values())}"
            )
    if variant.sparse and config.index_slot >= slot_capacity(config, shapes):
        raise ConfigError("index_slot", f"slot {config.index_slot} does not fit: r={config.r} gives "
                                        f"{slot_capacity(config, shapes)} disjoint slots on these layers")


def slot_capacity(config: SBoRAConfig, shapes: dict[str, tuple[int, int]]) -> int:
    """How many disjoint index sets of size r every targeted layer holds: min over layers of dim // r."""
    return min(config.kind.selection_dim(d_out, d_in) // config.r for d_out, d_in in shapes.values())


# Families whose layers hand these projections' weights straight to a fused kernel: a wrapped layer
# would be bypassed (Mamba's mixer reads x_proj/dt_proj/out_proj.weight), so they cannot be adapted.
_WEIGHTS_READ_DIRECTLY: dict[str, tuple[str, ...]] = {"mamba": ("x_proj", "dt_proj", "out_proj"), "falcon_mamba": ("x_proj", "dt_proj", "out_proj")}


def check_config(model: nn.Module, config: SBoRAConfig) -> dict[str, nn.Module]:
    """The layers `config` would adapt on `model`; ConfigError naming the field if it cannot.

    Works on a meta-device model too, so a service can check a job before any weights load.
    """
    targets = select_targets(model, config.target_modules)
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    bypassed = sorted({n.split(".")[-1] for n in targets} & set(_WEIGHTS_READ_DIRECTLY.get(model_type, ())))
    if bypassed:
        raise ConfigError("target_modules", f"{model_type} models read the weights of {', '.join(bypassed)} directly, "
                                            "bypassing any adapter; target the other layers by name "
                                            f"(e.g. ['in_proj'])")
    check_rank(config, {n: shape_of(m) for n, m in targets.items()})
    return targets


def draw_indices(dim: int, r: int, seed: int, module_name: str, slot: int = 0) -> torch.Tensor:
    """r distinct indices in [0, dim), uniform without replacement, reproducible per layer.

    The generator's seed mixes the adapter's `index_seed` with the module name,
    so every layer gets its own set and the same config always gets the same sets.
    The set is block `slot` of the layer's permutation: adapters that share an
    `index_seed` and take different slots change disjoint columns (FA) or rows
    (FB) of every layer, so they compose exactly (slot 0 is the plain draw).
    """
    if (slot + 1) * r > dim:
        raise ConfigError("index_slot", f"slot {slot} needs {(slot + 1) * r} indices; {module_name} has {dim}")
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.randperm(dim, generator=generator)[slot * r:(slot + 1) * r].sort().values  # (r,) int64


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_adapter(
    model: nn.Module,
    config: SBoRAConfig,
    *,
    fast_path: bool = True,
    indices: dict[str, torch.Tensor] | None = None,
) -> dict[str, SBoRALinear]:
    """Wrap the targeted layers of `model` in place; returns the new layers by name.

    All base parameters are frozen; only the adapter factors train. `indices`
    overrides the drawn index sets (used when loading a stored adapter).
    """
    if any(isinstance(m, SBoRALinear) for m in model.modules()):
        raise ValueError("model already carries an adapter; remove_adapter() first")
    targets = check_config(model, config)
    for p in model.parameters():
        p.requires_grad_(False)

    variant = config.kind
    layers: dict[str, SBoRALinear] = {}
    for name, base in targets.items():
        layer_indices = None
        if variant.sparse:
            dim = variant.selection_dim(*shape_of(base))
            layer_indices = indices[name] if indices is not None else draw_indices(
                dim, config.r, config.index_seed, name, config.index_slot)
        layer = SBoRALinear(base, variant, config.r, config.alpha, config.dropout, layer_indices)
        layer.train(base.training)  # a new module starts in training mode: dropout must follow the model's
        _set_submodule(model, name, layer)
        layers[name] = layer
    if fast_path:
        enable_fast_path(model)
    return layers


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, SBoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, SBoRALinear):
            yield name, module


def enable_fast_path(model: nn.Module) -> int:
    """Merge every SBoRA layer on an fp32 weight so training runs one matmul per layer."""
    count = 0
    for _, layer in adapter_layers(model):
        if layer.mergeable_for_training:
            layer.merge()
            count += 1
    return count


def remove_adapter(model: nn.Module) -> None:
    """Put the original layers back, their weights restored bit for bit."""
    for name, layer in list(adapter_layers(model)):
        layer.unmerge()
        _set_submodule(model, name, layer.base_layer)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_from_model(model: nn.Module, config: SBoRAConfig, metadata: dict | None = None) -> SparseAdapter:
    """A detached copy of the adapter currently on `model`."""
    layers = dict(adapter_layers(model))
    if not layers:
        raise ValueError("model carries no adapter")
    metadata = dict(metadata or {})
    if any(is_conv1d(layer.base_layer) for layer in layers.values()):
        metadata["fan_in_fan_out"] = True  # the base stores W transposed (GPT-2's Conv1D): PEFT must know
    return SparseAdapter(config=config, modules={n: layer.to_delta() for n, layer in layers.items()},
                         metadata=metadata)
