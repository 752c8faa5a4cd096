from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app.api.deps import CurrentTenant, SessionDep
from app.api.responses import ENGINE_RESTARTED
from app.core.db import look_up_then_release
from app.errors import Invalid
from app.schemas import GenerateRequest, GenerateResponse
from app.services.generation import (
    complete,
    resolve_target,
    start_generation,
    stream_pieces,
)
from sbora_core.serving.generation import Completion, SamplingParams

router = APIRouter(tags=["generate"])


@router.post("/generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}}}, 429: {"description": "queue full"},
                        504: {"description": "ran past SBORA_REQUEST_TIMEOUT_S"},
                        **ENGINE_RESTARTED})
async def generate(req: GenerateRequest, request: Request, session: SessionDep, tenant: CurrentTenant):
    """Generate from `prompt` (raw text) or `messages` (chat template), optionally with one or more
    adapters (`adapter_id`; a list composes adapters with disjoint index sets). `stream: true`
    answers with server-sent events: `token` events, then one `done` event."""
    if (req.prompt is None) == (req.messages is None):
        raise Invalid("prompt", "give exactly one of prompt or messages")
    adapter_ids = [req.adapter_id] if isinstance(req.adapter_id, str) else list(req.adapter_id or [])
    model_id, adapters = await look_up_then_release(session, resolve_target, tenant, req.base_model, adapter_ids,
                                                    isinstance(req.adapter_id, list))
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params = SamplingParams(req.max_new_tokens, req.temperature, req.top_p, stop, req.seed)
    messages = [m.model_dump() for m in req.messages] if req.messages is not None else None
    generation = await run_in_threadpool(start_generation, model_id, adapters, req.prompt, messages, params,
                                         req.adapter_weights, tenant.id)

    def response(done: Completion) -> GenerateResponse:
        return GenerateResponse(text=done.text, base_model=model_id, adapter_ids=generation.adapter_ids,
                                prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                                finish_reason="stop" if done.finish_reason == "stop" else "length")

    if not req.stream:
        return response(await complete(generation, request.is_disconnected))

    async def events():
        try:
            async for item in stream_pieces(generation, request.is_disconnected):
                if isinstance(item, Completion):
                    yield f"event: done\ndata: {response(item).model_dump_json()}\n\n"
                else:
                    yield f"event: token\ndata: {json.dumps({'text': item})}\n\n"
        except Exception as exc:  # the status line is sent already: the stream ends with an error event
            yield f"event: error\ndata: {json.dumps({'detail': str(exc)})}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
