"""Generation for the API: the engine process (`app.engine_process`), started on first use.

`start_generation` is what /generate and the OpenAI-compatible routes share:
the engine process checks the request against the model (token budget,
context length), loads and verifies the adapters through its cache, and
queues the request; the returned handle streams text.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from app import catalog, crud
from app.core.config import get_settings
from app.engine_process import AdapterRef, EngineLimits, EngineProcess, RemoteRequest
from app.models import Adapter, Tenant
from app.storage import get_store
from sbora_core.engine import SamplingParams

log = logging.getLogger("app")


_engine: EngineProcess | None = None
_engine_lock = threading.Lock()


def get_engine_process() -> EngineProcess:
    """The engine process, started on first use and again after it died."""
    global _engine
    with _engine_lock:
        if _engine is None or not _engine.alive():
            if _engine is not None:
                log.error("the generation engine process exited (code %s); starting a new one",
                          _engine.process.exitcode)
                _engine.close()
            settings = get_settings()
            _engine = EngineProcess(EngineLimits(settings.engine_max_batch_size, settings.engine_max_queue,
                                                 settings.adapter_cache_bytes, settings.resolved_torch_threads))
        return _engine


def reset_engines() -> None:
    """Stop the engine process (tests and shutdown); the next generation starts a fresh one."""
    global _engine
    with _engine_lock:
        if _engine is not None:
            _engine.close()
        _engine = None


def engine_cache_stats() -> dict[str, int]:
    """The running engine's adapter cache counters (empty before the first generation)."""
    engine = _engine
    return dict(engine.cache_stats) if engine is not None else {}


@dataclass
class Generation:
    handle: RemoteRequest
    model_id: str
    adapter_ids: list[str]
    started: float = field(default_factory=time.perf_counter)


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
    """Queue the request in the engine process; Invalid, QueueFull or AdapterIntegrityError when it is
    refused (blocking: call in a thread)."""
    settings = get_settings()
    if params.max_new_tokens > settings.generate_max_new_tokens:
        raise crud.Invalid("max_new_tokens", f"max_new_tokens: at most {settings.generate_max_new_tokens}")
    store = get_store()
    refs = [AdapterRef(a.id, str(store.local_path(a.storage_key)), a.weights_sha256) for a in adapters]
    handle = get_engine_process().submit(model_id, refs, prompt, messages, params)
    return Generation(handle, model_id, [a.id for a in adapters])
