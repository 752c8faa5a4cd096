"""OpenAI-compatible inference: /v1/models, /v1/completions, /v1/chat/completions (streaming too).

`model` is a base model id or one of the tenant's adapter ids; an adapter's
`parent` in /v1/models is its base; a fine-tuned model name
(`ft:<base>:<suffix>:<adapter id>`) names its adapter. Several adapters with disjoint index sets
compose when joined with '+' (`ad_...+ad_...`).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app import catalog
from app.api.deps import CurrentTenant, SessionDep
from app.api.responses import ENGINE_RESTARTED
from app.errors import NotFound
from app.openai_schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest
from app.services.adapters import get_adapter, list_adapters
from app.services.fine_tuning import adapter_of_model
from app.services.generation import (
    Generation,
    complete,
    resolve_target,
    start_generation,
    stream_pieces,
)
from sbora_core.engine import Completion, SamplingParams

router = APIRouter(prefix="/v1", tags=["openai"])


def _unknown_model(model: str) -> NotFound:
    return NotFound(f"model {model!r} is neither a base model nor one of your adapters")


def _target(session, tenant, model: str) -> tuple[str, list]:
    if model in catalog.offered():
        return resolve_target(session, tenant, model, [])
    try:
        return resolve_target(session, tenant, None, [adapter_of_model(m) for m in model.split("+")])
    except NotFound as exc:
        raise _unknown_model(model) from exc


def _base_model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "sbora-server"}


def _adapter_model_object(model: str, adapter, tenant) -> dict[str, Any]:
    """An adapter as an OpenAI model; `model` is the name asked for (the id, or an `ft:` name)."""
    return {"id": model, "object": "model", "created": int(adapter.created_at.timestamp()), "owned_by": tenant.id,
            "parent": adapter.base_model, "root": adapter.base_model}


def _params(req: SamplingRequest, max_tokens: int) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(max_tokens, req.temperature, req.top_p, stop, req.seed, req.ignore_eos)


def _finish(done: Completion) -> str:
    return "stop" if done.finish_reason == "stop" else "length"


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _sse(generation: Generation, chunk: Callable[[str | None, str | None, bool], str]) -> StreamingResponse:
    async def events():
        first = True
        try:
            async for item in stream_pieces(generation):
                if isinstance(item, Completion):
                    yield f"data: {chunk(None, _finish(item), first)}\n\n"
                    break
                yield f"data: {chunk(item, None, first)}\n\n"
                first = False
        except Exception as exc:  # the status line is sent already: report in the stream, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models")
def list_models(session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    rows, _ = list_adapters(session, tenant, None, limit=10_000, offset=0)
    data = [_base_model_object(m) for m in catalog.offered()] + [_adapter_model_object(a.id, a, tenant) for a in rows]
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
def retrieve_model(model: str, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    """A base model, one of the tenant's adapters, or a fine-tuned model name (`ft:...`)."""
    if model in catalog.offered():
        return _base_model_object(model)
    try:
        return _adapter_model_object(model, get_adapter(session, tenant, adapter_of_model(model)), tenant)
    except NotFound as exc:
        raise _unknown_model(model) from exc


@router.post("/completions", responses=ENGINE_RESTARTED)
async def completions(req: CompletionRequest, session: SessionDep, tenant: CurrentTenant):
    model_id, adapters = _target(session, tenant, req.model)
    generation = await run_in_threadpool(start_generation, model_id, adapters, req.prompt, None,
                                         _params(req, req.max_tokens))
    ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

    def body(choice: dict[str, Any], obj: Literal["text_completion"] = "text_completion", **extra) -> dict:
        return {"id": ident, "object": obj, "created": created, "model": req.model, "choices": [choice], **extra}

    if req.stream:
        def chunk(text: str | None, finish: str | None, _first: bool) -> str:
            return json.dumps(body({"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}))

        return _sse(generation, chunk)
    done = await complete(generation)
    return body({"text": done.text, "index": 0, "logprobs": None, "finish_reason": _finish(done)}, usage=_usage(done))


@router.post("/chat/completions", responses=ENGINE_RESTARTED)
async def chat_completions(req: ChatCompletionRequest, session: SessionDep, tenant: CurrentTenant):
    model_id, adapters = _target(session, tenant, req.model)
    max_tokens = req.max_completion_tokens or req.max_tokens or 256
    messages = [m.model_dump() for m in req.messages]
    generation = await run_in_threadpool(start_generation, model_id, adapters, None, messages,
                                         _params(req, max_tokens))
    ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    if req.stream:
        def chunk(text: str | None, finish: str | None, first: bool) -> str:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created, "model": req.model,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        return _sse(generation, chunk)
    done = await complete(generation)
    return {"id": ident, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": _finish(done)}],
            "usage": _usage(done)}
