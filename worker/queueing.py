"""A job's message back on the queue: for a worker that offers its devices, for the next attempt after
one of its ranks died, or to wait out an artifact store outage."""

from __future__ import annotations

import time
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from app.core.config import Settings
from app.core.db import session_scope
from app.errors import without_paths
from app.models import Job, JobEvent, utcnow
from app.queue import enqueue_job
from app.services.jobs import add_event, add_event_once
from app.storage import StorageUnavailable
from worker import ranks

BOUNCE_DELAY_S = 2.0  # a message no worker here can take is sent on after this, not at once


WAITING_FOR_STORE = "artifact_store"


def wait_for_store(job_id: str, owner: str, settings: Settings, exc: StorageUnavailable) -> bool:
    """Queue the job again to wait out an artifact store outage (the reconciler sends it after
    `queued_stale_s`, and its next attempt resumes from the last checkpoint); False once it has
    waited `storage_retry_s` since the outage first stopped it (a checkpoint in between starts the
    clock again: that was an earlier outage)."""
    now = utcnow()
    with session_scope() as session:
        first = None
        for event in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                            JobEvent.kind.in_(("status", "checkpoint")))
                                     .order_by(JobEvent.id)):
            if event.kind == "checkpoint":
                first = None
            elif event.data.get("waiting_for") == WAITING_FOR_STORE and first is None:
                first = event.created_at
        if (now - (first or now)).total_seconds() >= settings.storage_retry_s:
            return False
        requeued = _rows(session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                                           Job.status == "running")
                                .values(status="queued", lease_owner=None, lease_expires_at=None, worker_node=None,
                                        enqueued_at=now, updated_at=now)
                                .execution_options(synchronize_session=False)))
        if requeued == 1:
            add_event(session, job_id, "status", f"queued: waiting for the artifact store ({without_paths(str(exc))})",
                      {"status": "queued", "waiting_for": WAITING_FOR_STORE})
    return True


def _rows(result: Any) -> int:
    return cast(CursorResult[Any], result).rowcount


def requeue(job_id: str, owner: str, message: str, data: dict[str, Any]) -> bool:
    """Back to queued with a message for its next attempt: a free worker (set) resumes it from its
    last checkpoint, on any number of ranks. False if `owner` no longer holds it."""
    now = utcnow()
    with session_scope() as session:
        done = cast(CursorResult[Any], session.execute(
            update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
            .values(status="queued", lease_owner=None, lease_expires_at=None, worker_node=None, enqueued_at=now,
                    enqueued_attempt=Job.attempts + 1, updated_at=now)
            .execution_options(synchronize_session=False))).rowcount == 1
        if done:
            add_event(session, job_id, "status", message, data)
    if done:
        enqueue_job(job_id)
    return done


def fits_here(job_id: str, worker: str, offered: int) -> bool:
    """Whether this worker offers the devices the job asks for on one machine. If not, the message
    goes back on the queue for a worker that does, and the job says once what it waits for."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "queued":
            return True  # nothing to place: the claim decides
        wanted = ranks.job_resources(job.resources).devices
        if wanted <= offered:
            return True
        add_event_once(session, job_id, "log", f"queued: waiting for a worker with {wanted} devices ({worker} "
                                               f"offers {offered})", {"waiting_for": "workers"})
    time.sleep(BOUNCE_DELAY_S)
    enqueue_job(job_id)
    return False
