from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from app import metrics
from app.core.db import get_engine
from app.queue import broker_reachable
from app.storage import get_store

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz() -> JSONResponse:
    """Database, broker and artifact store are reachable (503 naming what is not)."""
    checks: dict[str, str] = {}
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    checks["broker"] = "ok" if broker_reachable() else "unreachable"
    try:
        store = get_store()
        probe = store.root / ".readyz"
        probe.write_text("ok")
        probe.unlink()
        checks["store"] = "ok"
    except OSError as exc:
        checks["store"] = f"not writable: {exc.strerror}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics() -> Response:
    """Prometheus text format; service-wide figures only (no tenant's data), so no key is needed."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
