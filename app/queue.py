"""Putting job ids on the broker. The database stays the source of truth: an id the broker loses
is found again by the reconciler (`worker.reconcile`)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def enqueue_job(job_id: str) -> bool:
    from app.core.config import get_settings
    from worker.celery_app import get_celery

    try:
        get_celery().send_task("sbora.train_job", args=[job_id], queue=get_settings().train_queue)
        return True
    except Exception as exc:  # broker down: the job stays queued in the database
        log.warning("could not enqueue %s (%s); the reconciler will retry", job_id, exc)
        return False


def broker_reachable() -> bool:
    from worker.celery_app import get_celery

    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
