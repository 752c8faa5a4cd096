from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from app import catalog, metrics
from app.core.config import get_settings
from app.core.db import get_engine, get_sessionmaker
from app.engine_process import engines_warm
from app.queue import broker_reachable
from app.services import workers
from app.storage import StorageUnavailable, get_store

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready: the checks say what is missing"}})
def readyz() -> JSONResponse:
    """Database, broker and artifact store reachable, and a live worker on the training queue
    (503 naming what is not); `workers` counts the live workers per queue."""
    checks: dict[str, str] = {}
    live: dict[str, int] = {}
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
        with get_sessionmaker()() as session:
            for worker in workers.live_workers(session):
                live[worker.queue] = live.get(worker.queue, 0) + 1
        queue = get_settings().train_queue
        checks["workers"] = "ok" if live.get(queue) else f"no live worker on queue {queue!r}"
        if get_settings().engine_warm_start:
            cold = engines_warm(list(catalog.offered()))
            checks["engine"] = "ok" if not cold else f"loading {', '.join(cold)}"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    checks["broker"] = "ok" if broker_reachable() else "unreachable"
    try:
        get_store().check()
        checks["store"] = "ok"
    except StorageUnavailable as exc:
        checks["store"] = str(exc)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks, "workers": live},
                        status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics() -> Response:
    """Prometheus text format; service-wide figures only (no tenant's data), so no key is needed."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
