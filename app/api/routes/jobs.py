from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, status
from fastapi.responses import StreamingResponse

from app.api.deps import CurrentTenant, SessionDep, SettingsDep
from app.core.db import get_sessionmaker, look_up_then_release
from app.models import JOB_STATUSES, TERMINAL_STATUSES, Tenant
from app.queue import enqueue_job
from app.schemas import JobCreate, JobEventPublic, JobPublic, Page
from app.services import jobs

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
def create_job(spec: JobCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep) -> JobPublic:
    """Validate and queue a fine-tuning job."""
    job = jobs.create_job(session, tenant, spec, settings)
    enqueue_job(job.id)
    return JobPublic.from_row(job)


@router.get("", response_model=Page[JobPublic])
def list_jobs(session: SessionDep, tenant: CurrentTenant,
              status: Annotated[str | None, Query(pattern=f"^({'|'.join(JOB_STATUSES)})$")] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              offset: Annotated[int, Query(ge=0, le=10**9)] = 0) -> Page[JobPublic]:
    rows, total = jobs.list_jobs(session, tenant, status, limit, offset)
    return Page(data=[JobPublic.from_row(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    return JobPublic.from_row(jobs.get_job(session, tenant, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, tenant: CurrentTenant) -> JobPublic:
    return JobPublic.from_row(jobs.cancel_job(session, tenant, job_id))


@router.get("/{job_id}/events", response_model=Page[JobEventPublic])
def list_events(job_id: str, session: SessionDep, tenant: CurrentTenant,
                after: Annotated[int, Query(ge=0, le=2**62, description="return events with id > after")] = 0,
                kind: Annotated[str | None, Query(pattern="^(status|log|metric|eval|checkpoint)$")] = None,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Page[JobEventPublic]:
    """Log and metric events in order; page with `after` = the last id seen. `kind=metric` is the loss curve."""
    rows, total = jobs.list_events(session, tenant, job_id, after, limit, kind)
    return Page(data=[JobEventPublic.model_validate(r) for r in rows], total=total, limit=limit, offset=0)


@router.get("/{job_id}/events/stream", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def stream_events(job_id: str, request: Request, session: SessionDep, tenant: CurrentTenant,
                        last_event_id: Annotated[int | None, Header(ge=0, le=2**62)] = None) -> StreamingResponse:
    """Server-sent events: every event as it is written, until the job ends. Reconnects resume
    from `Last-Event-ID`."""
    await look_up_then_release(session, jobs.get_job, tenant, job_id)  # 404 before the stream starts
    tenant_id = tenant.id

    async def events():
        after, idle = last_event_id or 0, 0
        owner = Tenant(id=tenant_id)
        while True:
            with get_sessionmaker()() as s:
                rows, _ = jobs.list_events(s, owner, job_id, after, 200)
                job_status = jobs.get_job(s, owner, job_id).status
            for row in rows:
                after = row.id
                payload = JobEventPublic.model_validate(row).model_dump_json()
                yield f"id: {row.id}\nevent: {row.kind}\ndata: {payload}\n\n"
            if not rows and job_status in TERMINAL_STATUSES:
                yield f"event: end\ndata: {json.dumps({'status': job_status})}\n\n"
                return
            if await request.is_disconnected():
                return
            if not rows:
                idle += 1
                if idle % 30 == 0:
                    yield ": keep-alive\n\n"  # keeps proxies from closing a quiet stream
                await asyncio.sleep(0.5)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
