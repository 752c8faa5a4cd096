"""The reconciler, run by the API: the database is the source of truth, so anything the broker lost is sent again.

It re-enqueues
- queued jobs that nobody has claimed for `stale_s` (their message was lost:
  a broker restarted without persistence, a worker killed after taking the
  message from the filesystem broker, an enqueue that failed);
- running jobs whose lease expired (their worker died; the next owner resumes
  from the last checkpoint).
Duplicate messages are harmless: a worker runs a job only after claiming it
with a conditional update, which exactly one claimant wins.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import and_, or_, select

from app.core.db import session_scope
from app.models import Job, utcnow
from app.queue import enqueue_job
from app.services.jobs import add_event

log = logging.getLogger(__name__)


def stale_jobs(stale_s: float) -> list[str]:
    now = utcnow()
    with session_scope() as session:
        query = select(Job.id).where(or_(
            and_(Job.status == "queued", Job.cancel_requested.is_(False),
                 Job.updated_at < now - timedelta(seconds=stale_s)),
            and_(Job.status == "running", Job.lease_expires_at < now),
        ))
        return list(session.scalars(query))


def reconcile_once(stale_s: float) -> list[str]:
    """Re-enqueue every stale job; returns their ids."""
    ids = stale_jobs(stale_s)
    for job_id in ids:
        if enqueue_job(job_id):
            with session_scope() as session:
                job = session.get(Job, job_id)
                if job is not None and job.status == "queued":
                    job.updated_at = utcnow()  # wait another stale_s before sending it again
                add_event(session, job_id, "log", "re-enqueued by the reconciler")
            log.info("re-enqueued %s", job_id)
    return ids


class Reconciler(threading.Thread):
    """Runs `reconcile_once` every `interval_s` until stopped."""

    def __init__(self, interval_s: float, stale_s: float) -> None:
        super().__init__(daemon=True, name="reconciler")
        self.interval_s, self.stale_s = interval_s, stale_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                reconcile_once(self.stale_s)
            except Exception:  # a database or broker blip: try again next round
                log.exception("reconcile round failed")

    def stop(self) -> None:
        self.stop_event.set()
