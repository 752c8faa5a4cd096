"""Generation for the API: one `sbora_core.engine.Engine` per base model, created on first use.

`start_generation` is what /generate and the OpenAI-compatible routes share:
it checks the request against the model (token budget, context length),
loads and verifies the adapters through the engine's cache, and queues the
request, returning a handle that streams text.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app import catalog, crud
from app.core.config import get_settings
from app.models import Adapter, Tenant
from app.storage import get_store
from sbora_core.engine import Engine, RequestHandle, SamplingParams


class Engines:
    def __init__(self) -> None:
        self.engines: dict[str, Engine] = {}
        self.lock = threading.Lock()

    def get(self, model_id: str) -> Engine:
        with self.lock:
            engine = self.engines.get(model_id)
            if engine is None:
                from sbora_core.models import load_base_model

                settings = get_settings()
                base = load_base_model(catalog.source_of(model_id))
                engine = self.engines[model_id] = Engine(
                    base, max_batch_size=settings.engine_max_batch_size, max_queue=settings.engine_max_queue,
                    cache_bytes=settings.adapter_cache_bytes,
                )
            return engine

    def close(self) -> None:
        with self.lock:
            for engine in self.engines.values():
                engine.close()
            self.engines.clear()


_engines: Engines | None = None


def get_engines() -> Engines:
    global _engines
    if _engines is None:
        _engines = Engines()
    return _engines


def reset_engines() -> None:
    global _engines
    if _engines is not None:
        _engines.close()
    _engines = None


@dataclass
class Generation:
    handle: RequestHandle
    model_id: str
    adapter_ids: list[str]


def resolve_target(session: Session, tenant: Tenant, model: str | None, adapter_ids: list[str]) -> tuple[str, list[Adapter]]:
    """The base model and the tenant's adapters a request names; Invalid/NotFound otherwise."""
    if len(set(adapter_ids)) != len(adapter_ids):
        raise crud.Invalid("adapter_id", "adapter_id: an adapter is listed twice")
    adapters = [crud.get_adapter(session, tenant, a) for a in adapter_ids]
    bases = {a.base_model for a in adapters} | ({model} if model else set())
    if len(bases) > 1:
        raise crud.Invalid("adapter_id", f"adapter_id: the adapters and the base model differ: {sorted(bases)}")
    model_id = bases.pop() if bases else next(iter(catalog.offered()))
    try:
        catalog.source_of(model_id)
    except catalog.UnknownBaseModel as exc:
        raise crud.Invalid("base_model", str(exc)) from exc
    return model_id, adapters


def start_generation(model_id: str, adapters: list[Adapter], prompt: str | None,
                     messages: list[dict[str, str]] | None, params: SamplingParams) -> Generation:
    """Validate against the model, load adapters, and queue the request (blocking: call in a thread)."""
    from sbora_core.data import render_chat

    settings = get_settings()
    if params.max_new_tokens > settings.generate_max_new_tokens:
        raise crud.Invalid("max_new_tokens", f"max_new_tokens: at most {settings.generate_max_new_tokens}")
    engine = get_engines().get(model_id)
    tokenizer = engine.tokenizer
    if messages is not None:
        ids = tokenizer(render_chat(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt or "")["input_ids"]
    if not ids:
        raise crud.Invalid("prompt", "prompt: empty")
    context = catalog.summary(model_id).get("max_position_embeddings") or 2048
    if len(ids) + params.max_new_tokens > context:
        raise crud.Invalid("prompt", f"prompt: {len(ids)} tokens + max_new_tokens {params.max_new_tokens} exceed "
                                     f"the model's context of {context} tokens")
    store = get_store()
    loaded = [engine.adapter(a.id, store.local_path(a.storage_key), a.weights_sha256) for a in adapters]
    try:
        handle = engine.submit(ids, loaded, params)
    except ValueError as exc:  # adapters whose index sets overlap
        raise crud.Invalid("adapter_id", f"adapter_id: {exc}") from exc
    return Generation(handle, model_id, [a.id for a in adapters])


def engine_stats() -> dict[str, Any]:
    engines = get_engines().engines
    return {name: {**e.stats, "queue_depth": e.queue_depth(), "cache_hits": e.cache.hits,
                   "cache_misses": e.cache.misses, "cache_evictions": e.cache.evictions} for name, e in engines.items()}
