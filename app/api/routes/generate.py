from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app import catalog, crud
from app.api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from app.inference import AdapterRef, Completion, get_generator
from app.schemas import GenerateRequest, GenerateResponse
from sbora_core.merge import AdapterOverlapError

router = APIRouter(tags=["generate"])


@router.post("/generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def generate(req: GenerateRequest, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep,
                   store: StoreDep):
    """Generate from `prompt` (raw text) or `messages` (chat template), optionally with one or more
    adapters (`adapter_id`, a list composes adapters with disjoint index sets). `stream: true`
    answers with server-sent events: `token` events, then one `done` event."""
    if (req.prompt is None) == (req.messages is None):
        raise crud.Invalid("prompt", "give exactly one of prompt or messages")
    ids = [req.adapter_id] if isinstance(req.adapter_id, str) else list(req.adapter_id or [])
    if len(set(ids)) != len(ids):
        raise crud.Invalid("adapter_id", "adapter_id: an adapter is listed twice")
    adapters = [crud.get_adapter(session, tenant, a) for a in ids]
    bases = {a.base_model for a in adapters}
    if req.base_model is not None:
        bases.add(req.base_model)
    if len(bases) > 1:
        raise crud.Invalid("adapter_id", f"adapter_id: adapters and base_model name different base models {sorted(bases)}")
    model_id = bases.pop() if bases else next(iter(catalog.offered()))
    try:
        catalog.source_of(model_id)
    except catalog.UnknownBaseModel as exc:
        raise crud.Invalid("base_model", str(exc)) from exc
    if req.max_new_tokens > settings.generate_max_new_tokens:
        raise crud.Invalid("max_new_tokens", f"max_new_tokens: at most {settings.generate_max_new_tokens}")
    generator = get_generator()
    messages = [m.model_dump() for m in req.messages] if req.messages is not None else None
    prompt_ids = await run_in_threadpool(generator.prompt_ids, model_id, req.prompt, messages)
    context = catalog.summary(model_id).get("max_position_embeddings") or 2048
    if len(prompt_ids) + req.max_new_tokens > context:
        raise crud.Invalid("prompt", f"prompt: {len(prompt_ids)} tokens + max_new_tokens {req.max_new_tokens} "
                                     f"exceed the model's context of {context} tokens")
    refs = [AdapterRef(a.id, store.local_path(a.storage_key), a.weights_sha256) for a in adapters]
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    try:
        loaded = await run_in_threadpool(generator.load, model_id, refs)
    except AdapterOverlapError as exc:
        raise crud.Invalid("adapter_id", f"adapter_id: {exc}") from exc
    pieces = generator.stream(model_id, loaded, prompt_ids, req.max_new_tokens, req.temperature, req.top_p,
                              stop, req.seed)

    def result(done: Completion) -> GenerateResponse:
        return GenerateResponse(text=done.text, base_model=model_id, adapter_ids=ids,
                                prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                                finish_reason=done.finish_reason)  # type: ignore[arg-type]

    if not req.stream:
        items = await run_in_threadpool(list, pieces)
        return result(items[-1])

    async def events():
        try:
            while (item := await run_in_threadpool(next, pieces, None)) is not None:
                if isinstance(item, Completion):
                    yield f"event: done\ndata: {result(item).model_dump_json()}\n\n"
                else:
                    yield f"event: token\ndata: {json.dumps({'text': item})}\n\n"
        finally:
            # Closing the generator restores the merged weights and releases the model lock,
            # also when the client went away mid-stream.
            await run_in_threadpool(pieces.close)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
