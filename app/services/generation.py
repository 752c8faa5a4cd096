"""Generation: the engine process (`app.engine_process`), started on first use, and what every
generation route shares.

`resolve_target` turns a request's model and adapter ids into a base model and
the tenant's adapters; `start_generation` hands the request to the engine
process, which checks it against the model (token budget, context length),
loads and verifies the adapters through its cache and queues it;
`stream_pieces` / `complete` read the answer on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from app import catalog
from app.core.config import get_settings
from app.engine_process import AdapterRef, RemoteRequest, get_engine_process
from app.errors import ClientGone, Invalid, RequestTimeout
from app.metrics import observe_generation
from app.models import Adapter, Tenant
from app.services.adapters import adapter_files, get_named_adapter
from app.storage import get_store
from sbora_core.serving.generation import Completion, SamplingParams


@dataclass
class Generation:
    handle: RemoteRequest
    model_id: str
    adapter_ids: list[str]
    started: float = field(default_factory=time.perf_counter)


def resolve_target(session: Session, tenant: Tenant, model: str | None, adapter_ids: list[str],
                   listed: bool = False) -> tuple[str, list[Adapter]]:
    """The base model and the tenant's adapters a request names (`listed`: `adapter_id` came as a list,
    so a missing one is named `adapter_id[i]`); Invalid/NotFound otherwise."""
    if len(set(adapter_ids)) != len(adapter_ids):
        raise Invalid("adapter_id", "adapter_id: an adapter is listed twice")
    named = ["adapter_id"] if len(adapter_ids) == 1 and not listed else [f"adapter_id[{i}]" for i in range(len(adapter_ids))]
    adapters = [get_named_adapter(session, tenant, a, field) for a, field in zip(adapter_ids, named, strict=True)]
    bases = {a.base_model for a in adapters} | ({model} if model else set())
    if len(bases) > 1:
        raise Invalid("adapter_id", f"adapter_id: the adapters and the base model differ: {sorted(bases)}")
    model_id = bases.pop() if bases else next(iter(catalog.offered()))
    try:
        catalog.source_of(model_id)
    except catalog.UnknownBaseModel as exc:
        raise Invalid("base_model", str(exc)) from exc
    return model_id, adapters


def start_generation(model_id: str, adapters: list[Adapter], prompt: str | list[int] | None,
                     messages: list[dict[str, str]] | None, params: SamplingParams,
                     weights: list[float] | None = None, tenant: str = "") -> Generation:
    """Queue the request in the engine process; Invalid, QueueFull or AdapterIntegrityError when it is
    refused (blocking: call in a thread)."""
    settings = get_settings()
    if params.max_new_tokens > settings.generate_max_new_tokens:
        raise Invalid("max_new_tokens", f"max_new_tokens: at most {settings.generate_max_new_tokens}")
    store = get_store()
    if weights is not None and len(weights) != len(adapters):
        raise Invalid("adapter_weights", f"adapter_weights: {len(weights)} weight(s) for {len(adapters)} adapter(s); "
                                         "give one per adapter_id, in the same order")
    refs = [AdapterRef(a.id, str(adapter_files(a, store)), a.weights_sha256, w)
            for a, w in zip(adapters, weights or [1.0] * len(adapters), strict=True)]
    handle = get_engine_process().submit(model_id, catalog.source_of(model_id), refs, prompt, messages, params,
                                         tenant)
    return Generation(handle, model_id, [a.id for a in adapters])


POLL_S = 0.2  # how often a request waiting on the engine checks whether its client is still there


# The route's check that its client is still connected (Starlette's Request.is_disconnected): a
# callable, so that the services need no web framework.
DisconnectCheck = Callable[[], Awaitable[bool]]


async def stream_pieces(generation: Generation,
                        disconnected: DisconnectCheck | None = None) -> AsyncIterator[str | Completion]:
    """Text pieces, then the Completion. The request is cancelled when the client goes away (ClientGone
    when `disconnected` says so) or when it runs past SBORA_REQUEST_TIMEOUT_S (RequestTimeout)."""
    handle = generation.handle
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    timeout_s = get_settings().request_timeout_s
    deadline = loop.time() + timeout_s
    # Pieces arrive on the engine client's thread; hand them to this event loop without holding a
    # worker thread per waiting request.
    def deliver(item: object) -> None:
        loop.call_soon_threadsafe(inbox.put_nowait, item)

    handle.listen(deliver)
    # Asked on a clock, not only when no piece came for a while: pieces of a long generation keep
    # arriving, and a client that left must not keep its request decoding to the end.
    next_check = loop.time() + POLL_S
    try:
        while True:
            now = loop.time()
            left = deadline - now
            if left <= 0:
                raise RequestTimeout(f"the request ran past {timeout_s:g} s (SBORA_REQUEST_TIMEOUT_S) and was "
                                     "cancelled; ask for fewer tokens or a shorter prompt")
            if disconnected is not None and now >= next_check:
                next_check = now + POLL_S
                if await disconnected():
                    raise ClientGone("the client disconnected; the request was cancelled") from None
            try:
                item = await asyncio.wait_for(inbox.get(), timeout=min(left, POLL_S))
            except TimeoutError:
                continue
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Completion):
                observe_generation(generation.started, item.completion_tokens)
                yield item
                return
            yield item
    finally:
        handle.cancel()  # no-op once finished; frees the batch slot when the client left early


async def complete(generation: Generation, disconnected: DisconnectCheck | None = None) -> Completion:
    async for item in stream_pieces(generation, disconnected):
        if isinstance(item, Completion):
            return item
    raise RuntimeError("generation ended without a completion")
