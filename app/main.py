"""The FastAPI application: routes, error mapping, and migrations at start."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app import crud
from app.api.routes import adapters, datasets, generate, health, jobs, models
from app.inference import AdapterIntegrityError
from app.migrate import upgrade_database

log = logging.getLogger("app")


@asynccontextmanager
async def lifespan(_: FastAPI):
    upgrade_database()
    yield


def create_app() -> FastAPI:
    app = FastAPI(
        title="sbora-server",
        version="0.1.0",
        description="Fine-tune language models with SBoRA, keep the sparse adapters, generate with them.",
        lifespan=lifespan,
    )
    for router in (health.router, models.router, datasets.router, jobs.router, adapters.router, generate.router):
        app.include_router(router)

    @app.exception_handler(crud.NotFound)
    async def not_found(_: Request, exc: crud.NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(crud.Invalid)
    async def invalid(_: Request, exc: crud.Invalid) -> JSONResponse:
        body: dict = {"detail": [{"loc": ["body", *exc.field.split(".")], "msg": exc.message, "type": "value_error"}]}
        if exc.errors is not None:
            body["errors"] = exc.errors
        return JSONResponse(body, status_code=422)

    @app.exception_handler(crud.Conflict)
    async def conflict(_: Request, exc: crud.Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(crud.TooLarge)
    async def too_large(_: Request, exc: crud.TooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(AdapterIntegrityError)
    async def corrupted(_: Request, exc: AdapterIntegrityError) -> JSONResponse:
        log.error("%s", exc)
        return JSONResponse({"detail": f"{exc}; the adapter must be trained or uploaded again"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    return app


app = create_app()
