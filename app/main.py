"""The FastAPI application: routes, error mapping, and migrations at start."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import catalog
from app.api.body_limit import BodyLimit
from app.api.middleware import ObservedRequests
from app.api.responses import ERROR_RESPONSES, OPENAI_ERROR_RESPONSES
from app.api.routes import (
    adapters,
    datasets,
    evaluations,
    generate,
    groups,
    health,
    jobs,
    models,
    openai_compat,
    openai_finetune,
)
from app.core.config import get_settings
from app.core.db import fill_pool, get_engine
from app.engine_process import EngineStopped, EngineWatchdog, reset_engines, warm_engines
from app.errors import (
    ClientGone,
    Conflict,
    Invalid,
    NotFound,
    QuotaExceeded,
    RequestTimeout,
    TooLarge,
    Unsupported,
)
from app.migrate import upgrade_database
from app.reconcile import Reconciler
from app.storage import StorageCorrupt, StorageUnavailable, get_store
from app.web import install_dashboard
from sbora_core.serving.admission import OverLimit, QueueFull
from sbora_core.serving.engine import AdapterIntegrityError

log = logging.getLogger("app")

@asynccontextmanager
async def lifespan(_: FastAPI):
    upgrade_database()
    settings = get_settings()
    fill_pool(get_engine())
    try:
        get_store().check()
    except StorageUnavailable as exc:  # serve anyway: /readyz says not ready until the store answers
        log.error("the artifact store cannot be written: %s", exc)
    reconciler = Reconciler(settings.reconcile_interval_s)
    reconciler.start()
    watchdog = EngineWatchdog()
    watchdog.start()
    warming = None
    if settings.engine_warm_start:
        # In the background: starting the first engine may take seconds (engine_start_context), and
        # the API answers meanwhile (/readyz says which models are not warm yet).
        models = {model_id: catalog.source_of(model_id) for model_id in catalog.offered()}
        warming = threading.Thread(target=warm_engines, args=(models,), name="engine-warm-start", daemon=True)
        warming.start()
    yield
    watchdog.stop()
    reconciler.stop()
    if warming is not None:
        warming.join(timeout=60)  # an engine it is still starting would outlive reset_engines
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


def allowed_methods(app: FastAPI, path: str) -> set[str]:
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path_regex.match(path):
            methods |= route.methods or set()
    return methods


def create_app() -> FastAPI:
    app = FastAPI(
        title="sbora-server",
        version="0.1.0",
        description="Fine-tune language models with SBoRA, keep the sparse adapters, generate with them.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit)  # inside ObservedRequests (added last, so outermost): its 413s are logged
    app.add_middleware(ObservedRequests)
    app.include_router(health.router)
    install_dashboard(app)  # GET / and /static/...: the web dashboard
    for router in (models.router, datasets.router, jobs.router, evaluations.router, adapters.router, groups.router,
                   generate.router):
        app.include_router(router, responses=ERROR_RESPONSES)
    app.include_router(openai_compat.router, responses=OPENAI_ERROR_RESPONSES)
    app.include_router(openai_finetune.router, responses=OPENAI_ERROR_RESPONSES)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette lists the methods of the first matching route only; list every route's.
            headers["Allow"] = ", ".join(sorted(allowed_methods(app, request.url.path)))
        return error(request, exc.status_code, exc.detail, headers=headers)

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return error(request, 404, str(exc), param=exc.param)

    @app.exception_handler(Unsupported)
    async def unsupported(request: Request, exc: Unsupported) -> JSONResponse:
        return error(request, 400, exc.message, param=exc.param)

    @app.exception_handler(Invalid)
    async def invalid(request: Request, exc: Invalid) -> JSONResponse:
        detail: Any = [{"loc": ["body", *exc.field.split(".")], "msg": exc.message, "type": "value_error"}]
        if request.url.path.startswith("/v1/"):
            # Already names the field (OpenAI's body carries it in `param` too); its body has no list, so
            # line-numbered problems go into the message.
            detail = exc.message + "".join(
                f"\n{'line ' + str(e['line']) + ': ' if e.get('line') else ''}{e.get('message', '')}"
                for e in exc.errors or [])
        return error(request, 422, detail, param=exc.field,
                     extra={"errors": exc.errors} if exc.errors is not None else None)

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> JSONResponse:
        return error(request, 409, str(exc))

    @app.exception_handler(TooLarge)
    async def too_large(request: Request, exc: TooLarge) -> JSONResponse:
        return error(request, 413, str(exc))

    @app.exception_handler(OverLimit)
    async def over_limit(request: Request, exc: OverLimit) -> JSONResponse:
        return error(request, 413, exc.message, param=exc.field)

    @app.exception_handler(RequestTimeout)
    async def timed_out(request: Request, exc: RequestTimeout) -> JSONResponse:
        return error(request, 504, str(exc))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        return error(request, 499, str(exc))  # nobody reads it; the log line says what happened

    @app.exception_handler(QuotaExceeded)
    async def over_quota(request: Request, exc: QuotaExceeded) -> JSONResponse:
        return error(request, 429, str(exc), headers={"Retry-After": "60"})

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error(request, 429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(EngineStopped)
    async def engine_stopped(request: Request, exc: EngineStopped) -> JSONResponse:
        return error(request, 503, str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(PoolTimeout)
    async def database_busy(request: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("no database connection free within the pool's timeout: %s", exc)
        return error(request, 503, "the service is overloaded: no database connection came free; retry",
                     headers={"Retry-After": "2"})

    @app.exception_handler(StorageUnavailable)
    async def storage_unavailable(request: Request, exc: StorageUnavailable) -> JSONResponse:
        log.error("artifact store: %s", exc)
        return error(request, 503, f"the artifact store is unavailable: {exc}; retry", headers={"Retry-After": "5"})

    @app.exception_handler(StorageCorrupt)
    async def storage_corrupt(request: Request, exc: StorageCorrupt) -> JSONResponse:
        log.error("%s", exc)
        return error(request, 500, f"{exc}; upload or train it again")

    @app.exception_handler(AdapterIntegrityError)
    async def corrupted(request: Request, exc: AdapterIntegrityError) -> JSONResponse:
        log.error("%s", exc)
        return error(request, 500, f"{exc}; the adapter must be trained or uploaded again")

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        # A body that is not JSON has no field to name (its loc holds a character position).
        named = [e for e in errors if e["type"] != "json_invalid"]
        first = ".".join(str(p) for p in named[0]["loc"][1:]) if named else None
        return error(request, 422, errors, param=first or None)

    return app


app = create_app()
