"""The reconciler, run by the API: the database is the source of truth, so what the broker lost is sent again.

Every `reconcile_interval_s` it looks at
- jobs held by a dead holder (lease expired, or its worker missed three
  heartbeats): a `cancelling` one ends `cancelled`; a `running` one gets one
  message for its next attempt, and the next worker resumes it from its last
  checkpoint. A pool process that died under a live worker is left to Celery,
  which puts the job's own message back (`reject_on_worker_lost`);
- queued jobs whose message was lost (a broker restarted without its queue, a
  worker killed after taking the message): a job queued for `queued_stale_s`
  since its last message is sent again while a live worker of its queue has
  sat idle that long too (it would have taken a waiting message; a worker
  holding a message is busy from its arrival, before its job is claimed). With
  no live worker nothing is sent: the message waits.

At most one message is outstanding per job attempt: each send is first
recorded on the job row with a conditional update (`enqueued_attempt`,
`enqueued_at`), so two API replicas never both send, and a failed send is
taken back. Duplicates are harmless anyway: a worker runs a job only after
claiming it, which exactly one claimant wins.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.models import LEASED_STATUSES, Job, utcnow
from app.queue import enqueue_job
from app.services import groups, workers
from app.services.jobs import add_event

log = logging.getLogger(__name__)


Sent = tuple[int, datetime | None]  # (enqueued_attempt, enqueued_at) of a job row


def _swap(job_id: str, expected: Sent, new: Sent) -> bool:
    """Set the job's record of its last send to `new` if it still is `expected` (compare-and-swap)."""
    attempt, at = expected
    with session_scope() as session:
        done = session.execute(update(Job).where(Job.id == job_id, Job.enqueued_attempt == attempt,
                                                 Job.enqueued_at.is_(None) if at is None else Job.enqueued_at == at)
                               .values(enqueued_attempt=new[0], enqueued_at=new[1])
                               .execution_options(synchronize_session=False))
        return cast(CursorResult[Any], done).rowcount == 1


def _send(job_id: str, expect_attempt: int, expect_at: datetime | None, attempt: int, why: str) -> bool:
    """Send one message for `attempt`, unless another sender recorded one since we looked."""
    before, after = (expect_attempt, expect_at), (attempt, utcnow())
    if not _swap(job_id, before, after):
        return False
    if not enqueue_job(job_id):  # the broker is down: take the record back, try next round
        _swap(job_id, after, before)
        return False
    with session_scope() as session:
        add_event(session, job_id, "log", f"sent to the workers again: {why}")
    log.info("re-enqueued %s: %s", job_id, why)
    return True


def reconcile_once(settings: Settings | None = None) -> list[str]:
    """One round; the ids of the jobs sent again (or ended, for `cancelling` ones whose worker died)."""
    settings = settings or get_settings()
    now = utcnow()
    acted: list[str] = []
    sends: list[tuple[str, int, datetime | None, int, str]] = []
    with session_scope() as session:
        for job in session.scalars(select(Job).where(Job.status.in_(LEASED_STATUSES))):
            if not workers.holder_dead(session, job, now, check_process=False):
                continue
            if job.status == "cancelling":
                job.status, job.finished_at, job.lease_expires_at = "cancelled", now, None
                groups.release_job(session, job.id)
                add_event(session, job.id, "status", "cancelled (its worker stopped)", {"status": "cancelled"})
                acted.append(job.id)
            elif job.enqueued_attempt <= job.attempts:  # no message yet for the next attempt
                sends.append((job.id, job.enqueued_attempt, job.enqueued_at, job.attempts + 1,
                              "its worker stopped; the next one resumes from the last checkpoint"))
        # A worker idle this long would have taken any message waiting on its queue.
        stale = timedelta(seconds=settings.queued_stale_s)
        workers.forget_long_dead(session, now)
        idle_long = any(w.queue == settings.train_queue and w.idle_since is not None and now - w.idle_since >= stale
                        for w in workers.live_workers(session, now))
        queued = session.scalars(select(Job).where(Job.status == "queued", Job.cancel_requested.is_(False)))
        for job in queued if idle_long else []:
            if now - (job.enqueued_at or job.created_at) >= stale:
                sends.append((job.id, job.enqueued_attempt, job.enqueued_at, job.attempts + 1,
                              "its message was lost (an idle worker never received it)"))
    for job_id, expect_attempt, expect_at, attempt, why in sends:
        if _send(job_id, expect_attempt, expect_at, attempt, why):
            acted.append(job_id)
    return acted


class Reconciler(threading.Thread):
    """Runs `reconcile_once` every `interval_s` until stopped."""

    def __init__(self, interval_s: float) -> None:
        super().__init__(daemon=True, name="reconciler")
        self.interval_s = interval_s
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                reconcile_once()
            except Exception:  # a database or broker blip: try again next round
                log.exception("reconcile round failed")

    def stop(self) -> None:
        self.stop_event.set()
