"""OpenAI-compatible inference: /v1/models, /v1/completions, /v1/chat/completions (streaming too).

`model` is a base model id or one of the tenant's adapter ids; an adapter's
`parent` in /v1/models is its base; a fine-tuned model name
(`ft:<base>:<suffix>:<adapter id>`, or `...:ckpt-step-N` for a checkpoint) names
its adapter. Several adapters with disjoint index sets compose when joined with
'+' (`ad_...+ad_...`). Parameters the server does not implement answer 400
naming them; errors name the request's own fields (`model`, `max_tokens`, ...).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from app import catalog
from app.api.deps import CurrentTenant, SessionDep
from app.api.responses import ENGINE_RESTARTED
from app.core.db import look_up_then_release
from app.errors import Invalid, NotFound, Unsupported
from app.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIMessage,
    SamplingRequest,
)
from app.services.adapters import get_adapter, list_adapters
from app.services.fine_tuning import adapter_of_model
from app.services.generation import (
    Generation,
    complete,
    resolve_target,
    start_generation,
    stream_pieces,
)
from sbora_core.serving.generation import Completion, SamplingParams, TokenLogprob

router = APIRouter(prefix="/v1", tags=["openai"])


def _unknown_model(model: str) -> NotFound:
    return NotFound(f"model {model!r} is neither a base model nor one of your adapters", param="model")


def _target(session, tenant, model: str) -> tuple[str, list]:
    try:
        if model in catalog.offered():
            return resolve_target(session, tenant, model, [])
        return resolve_target(session, tenant, None, [adapter_of_model(m) for m in model.split("+")])
    except NotFound as exc:
        raise _unknown_model(model) from exc
    except Invalid as exc:  # the adapters a `model` names do not go together
        raise Invalid("model", exc.message.replace("adapter_id", "model")) from exc


def _base_model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "sbora-server"}


def _adapter_model_object(model: str, adapter, tenant) -> dict[str, Any]:
    """An adapter as an OpenAI model; `model` is the name asked for (the id, or an `ft:` name)."""
    return {"id": model, "object": "model", "created": int(adapter.created_at.timestamp()), "owned_by": tenant.id,
            "parent": adapter.base_model, "root": adapter.base_model}


def _refuse_unimplemented(req: SamplingRequest) -> None:
    """400 naming the first parameter this server would otherwise have to ignore."""
    for name in ("tools", "tool_choice", "functions", "function_call"):
        if getattr(req, name):
            raise Unsupported(name, f"{name}: tool and function calling is not supported by this server")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise Unsupported("response_format", "response_format: only {'type': 'text'} is supported")
    if req.n != 1:
        raise Unsupported("n", "n: one choice per prompt is supported; send the request again for another")


def _params(req: SamplingRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(max_tokens, req.temperature, req.top_p, stop, req.seed, req.ignore_eos, logprobs)


async def _start(tenant, model_id: str, adapters: list, prompt: str | list[int] | None, messages: list[dict[str, str]] | None,
                 params: SamplingParams, max_tokens_field: str) -> Generation:
    """start_generation, with errors naming the OpenAI request's fields."""
    try:
        return await run_in_threadpool(start_generation, model_id, adapters, prompt, messages, params, None,
                                       tenant.id)
    except Invalid as exc:
        field = {"adapter_id": "model", "max_new_tokens": max_tokens_field}.get(exc.field, exc.field)
        if field == "prompt" and messages is not None:
            field = "messages"
        raise Invalid(field, exc.message.replace(exc.field, field, 1), exc.errors) from exc


def _chat_messages(messages: list[OpenAIMessage]) -> list[dict[str, str]]:
    """OpenAI messages as the engine takes them: the developer role is a system turn, content parts
    are joined when they are text, and anything else answers 400 naming it."""
    out = []
    for i, message in enumerate(messages):
        if message.role in ("tool", "function"):
            raise Unsupported(f"messages[{i}].role", f"messages[{i}].role: {message.role!r} messages need tool "
                                                     "calling, which this server does not support")
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise Unsupported(f"messages[{i}].content[{j}].type",
                                      f"messages[{i}].content[{j}]: only text parts are supported, not {part.type!r}")
            content = "".join(part.text or "" for part in message.content)
        else:
            content = message.content or ""
        out.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return out


def _finish(done: Completion) -> str:
    return "stop" if done.finish_reason == "stop" else "length"


def _usage(done: list[Completion]) -> dict[str, int]:
    prompt, completion = sum(d.prompt_tokens for d in done), sum(d.completion_tokens for d in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_logprobs(tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if tokens is None:
        return None

    def entry(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in t.top]}
                        for t in tokens], "refusal": None}


def _completion_logprobs(tokens: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if tokens is None:
        return None
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, str | Completion]]:
    """The pieces of several generations as they come, each with its index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for item in stream_pieces(generation):
                await queue.put((index, item))
        except Exception as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        done = 0
        while done < len(generations):
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Completion):
                done += 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _sse(generations: list[Generation], chunk: Callable[[int, str | None, str | None, bool], str],
         usage_chunk: Callable[[list[Completion]], str] | None) -> StreamingResponse:
    """Server-sent events: `chunk(index, text, finish, first)` per piece, then, when asked for
    (stream_options.include_usage), `usage_chunk(completions)` with the usage, then [DONE]."""

    async def events() -> AsyncIterator[str]:
        first = [True] * len(generations)
        completions: list[Completion] = []
        try:
            async for index, item in _merged(generations):
                if isinstance(item, Completion):
                    completions.append(item)
                    yield f"data: {chunk(index, None, _finish(item), first[index])}\n\n"
                    continue
                yield f"data: {chunk(index, item, None, first[index])}\n\n"
                first[index] = False
        except Exception as exc:  # the status line is sent already: report in the stream, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
            return
        if usage_chunk is not None:
            yield f"data: {usage_chunk(completions)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models")
def list_models(session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    rows, _ = list_adapters(session, tenant, None, limit=10_000, offset=0)
    data = [_base_model_object(m) for m in catalog.offered(fresh=True)] + [_adapter_model_object(a.id, a, tenant) for a in rows]
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
def retrieve_model(model: str, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    """A base model, one of the tenant's adapters, or a fine-tuned model name (`ft:...`)."""
    if model in catalog.offered(fresh=True):
        return _base_model_object(model)
    try:
        return _adapter_model_object(model, get_adapter(session, tenant, adapter_of_model(model)), tenant)
    except NotFound as exc:
        raise _unknown_model(model) from exc


def _prompts(prompt: str | list) -> list[str | list[int]]:
    """The request's prompts: a text, texts, one list of token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


def _echoed(prompt: str | list[int], done: Completion) -> str:
    """The prompt's text: as sent, or its tokens' text when it came as token ids."""
    if isinstance(prompt, str):
        return prompt
    return "".join(t.token for t in done.prompt_logprobs or [] if t is not None)


def _echo_logprobs(done: Completion) -> dict[str, Any]:
    """OpenAI's echo layout: the prompt's tokens, then the completion's; the first has no log-probability."""
    entries = [t for t in done.prompt_logprobs or [] if t is not None] + list(done.logprobs or [])
    logprobs = _completion_logprobs(entries) or {}
    logprobs["top_logprobs"] = [None if t.logprob is None else dict(t.top) for t in entries]
    return logprobs


@router.post("/completions", responses=ENGINE_RESTARTED)
async def completions(req: CompletionRequest, session: SessionDep, tenant: CurrentTenant):
    _refuse_unimplemented(req)
    for name in ("best_of", "suffix"):
        if getattr(req, name) not in (None, False, 1):
            raise Unsupported(name, f"{name}: not supported by this server")
    if req.stream and req.logprobs is not None:
        raise Unsupported("logprobs", "logprobs: available without stream only")
    if req.stream and req.echo:
        raise Unsupported("echo", "echo: available without stream only")
    prompts = _prompts(req.prompt)
    if not prompts:
        raise Invalid("prompt", "prompt: give a string, token ids, or a non-empty list of either")
    if req.max_tokens == 0 and not req.echo:
        raise Invalid("max_tokens", "max_tokens: 0 generates nothing; it is for scoring a prompt with echo: true")
    model_id, adapters = await look_up_then_release(session, _target, tenant, req.model)
    params = _params(req, req.max_tokens, req.logprobs)
    if req.echo and (req.logprobs is not None or any(isinstance(p, list) for p in prompts)):
        # Every prompt token's log-probability (and its text: token-id prompts are echoed from it).
        params.prompt_logprobs = req.logprobs or 0
    generations = [await _start(tenant, model_id, adapters, p, None, params, "max_tokens") for p in prompts]
    ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())

    def body(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": ident, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, **extra}

    if req.stream:
        def chunk(index: int, text: str | None, finish: str | None, _first: bool) -> str:
            return json.dumps(body([{"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}]))

        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return _sse(generations, chunk,
                    (lambda done: json.dumps(body([], usage=_usage(done)))) if include_usage else None)
    done = [await complete(g) for g in generations]
    choices = []
    for i, (prompt, d) in enumerate(zip(prompts, done, strict=True)):
        logprobs = None if req.logprobs is None else _echo_logprobs(d) if req.echo else _completion_logprobs(d.logprobs)
        choices.append({"text": (_echoed(prompt, d) if req.echo else "") + d.text, "index": i, "logprobs": logprobs,
                        "finish_reason": _finish(d)})
    return body(choices, usage=_usage(done))


@router.post("/chat/completions", responses=ENGINE_RESTARTED)
async def chat_completions(req: ChatCompletionRequest, session: SessionDep, tenant: CurrentTenant):
    _refuse_unimplemented(req)
    if req.stream and req.logprobs:
        raise Unsupported("logprobs", "logprobs: available without stream only")
    if req.top_logprobs is not None and not req.logprobs:
        raise Invalid("top_logprobs", "top_logprobs: needs logprobs: true")
    messages = _chat_messages(req.messages)
    model_id, adapters = await look_up_then_release(session, _target, tenant, req.model)
    max_tokens = req.max_completion_tokens or req.max_tokens or 256
    field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    params = _params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    generation = await _start(tenant, model_id, adapters, None, messages, params, field)
    ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

    def body(obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": ident, "object": obj, "created": created, "model": req.model, "choices": choices, **extra}

    if req.stream:
        def chunk(index: int, text: str | None, finish: str | None, first: bool) -> str:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return json.dumps(body("chat.completion.chunk", [{"index": index, "delta": delta, "finish_reason": finish}]))

        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return _sse([generation], chunk,
                    (lambda done: json.dumps(body("chat.completion.chunk", [], usage=_usage(done))))
                    if include_usage else None)
    done = await complete(generation)
    return body("chat.completion", [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                     "logprobs": _chat_logprobs(done.logprobs), "finish_reason": _finish(done)}],
                usage=_usage([done]))
