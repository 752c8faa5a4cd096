"""The FastAPI application: routes, error mapping, and migrations at start."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import crud
from app.api.routes import adapters, datasets, generate, health, jobs, models, openai_compat
from app.inference import reset_engines
from app.migrate import upgrade_database
from sbora_core.engine import AdapterIntegrityError, QueueFull

log = logging.getLogger("app")


@asynccontextmanager
async def lifespan(_: FastAPI):
    from app.core.config import get_settings
    from worker.reconcile import Reconciler

    upgrade_database()
    settings = get_settings()
    reconciler = Reconciler(settings.reconcile_interval_s, settings.queued_stale_s)
    reconciler.start()
    yield
    reconciler.stop()
    reset_engines()


def error(request: Request, status: int, detail: Any, *, param: str | None = None,
          headers: dict[str, str] | None = None, extra: dict | None = None) -> JSONResponse:
    """Our error body ({"detail": ...}), or OpenAI's ({"error": {...}}) under /v1 so its SDK reads it."""
    if request.url.path.startswith("/v1/"):
        message = detail if isinstance(detail, str) else "; ".join(
            f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    else:
        body = {"detail": detail, **(extra or {})}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app() -> FastAPI:
    app = FastAPI(
        title="sbora-server",
        version="0.1.0",
        description="Fine-tune language models with SBoRA, keep the sparse adapters, generate with them.",
        lifespan=lifespan,
    )
    for router in (health.router, models.router, datasets.router, jobs.router, adapters.router,
                   generate.router, openai_compat.router):
        app.include_router(router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(request, exc.status_code, exc.detail, headers=exc.headers)

    @app.exception_handler(crud.NotFound)
    async def not_found(request: Request, exc: crud.NotFound) -> JSONResponse:
        return error(request, 404, str(exc))

    @app.exception_handler(crud.Invalid)
    async def invalid(request: Request, exc: crud.Invalid) -> JSONResponse:
        detail = [{"loc": ["body", *exc.field.split(".")], "msg": exc.message, "type": "value_error"}]
        return error(request, 422, detail, param=exc.field,
                     extra={"errors": exc.errors} if exc.errors is not None else None)

    @app.exception_handler(crud.Conflict)
    async def conflict(request: Request, exc: crud.Conflict) -> JSONResponse:
        return error(request, 409, str(exc))

    @app.exception_handler(crud.TooLarge)
    async def too_large(request: Request, exc: crud.TooLarge) -> JSONResponse:
        return error(request, 413, str(exc))

    @app.exception_handler(crud.QuotaExceeded)
    async def over_quota(request: Request, exc: crud.QuotaExceeded) -> JSONResponse:
        return error(request, 429, str(exc), headers={"Retry-After": "60"})

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error(request, 429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(AdapterIntegrityError)
    async def corrupted(request: Request, exc: AdapterIntegrityError) -> JSONResponse:
        log.error("%s", exc)
        return error(request, 500, f"{exc}; the adapter must be trained or uploaded again")

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(request, 422, [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()])

    return app


app = create_app()
