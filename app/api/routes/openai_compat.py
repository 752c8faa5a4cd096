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
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app import catalog, crud
from app.api.deps import CurrentTenant, SessionDep
from app.api.routes.generate import ENGINE_RESTARTED, complete, stream_pieces
from app.api.routes.openai_finetune import adapter_of_model
from app.inference import Generation, resolve_target, start_generation
from app.schemas import ChatMessage
from sbora_core.engine import Completion, SamplingParams

router = APIRouter(prefix="/v1", tags=["openai"])


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (logit_bias, user, ...) are ignored
    model: str = Field(..., min_length=1, max_length=500)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-text token (as in vLLM)")


class CompletionRequest(_Sampling):
    prompt: str = Field(..., max_length=1_000_000)
    max_tokens: int = Field(16, ge=1)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _unknown_model(model: str) -> crud.NotFound:
    return crud.NotFound(f"model {model!r} is neither a base model nor one of your adapters")


def _target(session, tenant, model: str) -> tuple[str, list]:
    if model in catalog.offered():
        return resolve_target(session, tenant, model, [])
    try:
        return resolve_target(session, tenant, None, [adapter_of_model(m) for m in model.split("+")])
    except crud.NotFound as exc:
        raise _unknown_model(model) from exc


def _base_model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "sbora-server"}


def _adapter_model_object(model: str, adapter, tenant) -> dict[str, Any]:
    """An adapter as an OpenAI model; `model` is the name asked for (the id, or an `ft:` name)."""
    return {"id": model, "object": "model", "created": int(adapter.created_at.timestamp()), "owned_by": tenant.id,
            "parent": adapter.base_model, "root": adapter.base_model}


def _params(req: _Sampling, max_tokens: int) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(max_tokens, req.temperature, req.top_p, stop, req.seed, req.ignore_eos)


def _finish(done: Completion) -> str:
    return "stop" if done.finish_reason == "stop" else "length"


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _sse(generation: Generation, chunk) -> StreamingResponse:
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
    rows, _ = crud.list_adapters(session, tenant, None, limit=10_000, offset=0)
    data = [_base_model_object(m) for m in catalog.offered()] + [_adapter_model_object(a.id, a, tenant) for a in rows]
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
def retrieve_model(model: str, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    """A base model, one of the tenant's adapters, or a fine-tuned model name (`ft:...`)."""
    if model in catalog.offered():
        return _base_model_object(model)
    try:
        return _adapter_model_object(model, crud.get_adapter(session, tenant, adapter_of_model(model)), tenant)
    except crud.NotFound as exc:
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
        def chunk(text, finish, _first):
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
        def chunk(text, finish, first):
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
