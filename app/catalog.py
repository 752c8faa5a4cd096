"""The base models this service offers, and checks made against them.

Two kinds: those `SBORA_MODELS` names when the service starts, and those an
admin registers at run time (`POST /models`, `sbora models add`), kept in the
database so every API process and worker sees them. A model's public id is its
known name (`smollm2-135m-instruct`), a local directory's name, or the name it
was registered under. Everything here reads config files only; no weights are
loaded.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.core.config import get_settings
from app.core.db import get_side_engine
from app.models import RegisteredModel
from sbora_core.method import models
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.inject import check_config
from sbora_core.method.linear import shape_of


class UnknownBaseModel(ValueError):
    pass


@lru_cache
def configured() -> dict[str, str]:
    """`SBORA_MODELS`: public model id -> what sbora_core.method.models resolves (a name or a directory)."""
    catalog: dict[str, str] = {}
    for source in get_settings().models:
        path = Path(source).expanduser()
        model_id = path.name if path.is_dir() else source
        catalog[model_id] = str(path.resolve()) if path.is_dir() else source
    return catalog


# Models added at run time, as last read: (monotonic time of the read, name -> source).
_registered: tuple[float, dict[str, str]] | None = None
_registered_lock = threading.Lock()
REGISTERED_TTL_S = 1.0


def registered(*, fresh: bool = False) -> dict[str, str]:
    """Models added at run time. Read from the database at most once a second (another process may
    have just added or removed one; `fresh` reads now), through a connection outside the request
    pool: the caller usually holds a pooled one already."""
    global _registered
    with _registered_lock:
        if fresh or _registered is None or time.monotonic() - _registered[0] > REGISTERED_TTL_S:
            with get_side_engine().connect() as connection:
                rows = connection.execute(select(RegisteredModel.name, RegisteredModel.source)
                                          .order_by(RegisteredModel.created_at))
                _registered = (time.monotonic(), {name: source for name, source in rows})
        return dict(_registered[1])


def forget_registered() -> None:
    """After this process added or removed a model: the next read goes to the database."""
    global _registered
    with _registered_lock:
        _registered = None


def offered(*, fresh: bool = False) -> dict[str, str]:
    """Every model on offer, the configured first (the default model leads): public id -> source.
    A configured id is never shadowed by a registered one."""
    fixed = configured()
    return {**fixed, **{name: source for name, source in registered(fresh=fresh).items() if name not in fixed}}


def source_of(model_id: str) -> str:
    catalog = offered()
    if model_id not in catalog:
        catalog = offered(fresh=True)  # registered in another process within the last second?
    if model_id not in catalog:
        raise UnknownBaseModel(
            f"base_model: unknown model {model_id!r}; available: {', '.join(sorted(catalog))}"
        )
    return catalog[model_id]


def use_model_cache() -> None:
    """Point sbora_core at this service's model cache (`SBORA_MODEL_CACHE`, a `.env` file included)."""
    models.set_model_cache_dir(get_settings().model_cache)


def prepare(model_id: str) -> Path:
    """The model's directory, converted or downloaded into the model cache first if need be."""
    use_model_cache()
    return models.resolve_model(source_of(model_id))


def summary(model_id: str) -> dict[str, Any]:
    return {**_summary(source_of(model_id)), "name": model_id}


def tokenizer(model_id: str) -> Any:
    return _tokenizer(source_of(model_id))


def has_chat_template(model_id: str) -> bool:
    return bool(getattr(tokenizer(model_id), "chat_template", None))


# Cached by source, not by public id: a name removed and registered again may point elsewhere.
@lru_cache(maxsize=64)
def _summary(source: str) -> dict[str, Any]:
    use_model_cache()
    return models.model_summary(source)


@lru_cache(maxsize=16)
def _tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    use_model_cache()
    return AutoTokenizer.from_pretrained(models.resolve_model(source))


def target_shapes(model_id: str, method: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every layer `method` adapts on the model (read from its config, no weights)."""
    use_model_cache()
    layers = check_config(models.meta_model(source_of(model_id)), SBoRAConfig(**method))
    return {name: shape_of(layer) for name, layer in layers.items()}


def check_method(model_id: str, method: dict[str, Any]) -> None:
    """ConfigError naming the field when the adapter does not fit the model (rank, targets)."""
    use_model_cache()
    check_config(models.meta_model(source_of(model_id)), SBoRAConfig(**method))
