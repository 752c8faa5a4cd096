"""The Celery application and putting job ids on the broker.

Messages carry only a job id; the database stays the source of truth, and an
id the broker loses is found again by the reconciler (`app.reconcile`). One
worker process per GPU runs one job at a time from the `train` queue.
`acks_late` with `reject_on_worker_lost` puts a job back on the queue when its
worker dies mid-run; the job row (and its checkpoints) say where to resume.
The task itself lives in `worker.tasks`; this side only sends its name.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Celery

from app.core.config import Settings, get_settings

log = logging.getLogger(__name__)
TRAIN_TASK = "sbora.train_job"
JOIN_TASK = "sbora.join_gang"  # (job id, formation): take a slot of a job spanning several machines


def make_celery(settings: Settings) -> Celery:
    app = Celery("sbora", broker=settings.resolved_broker_url)
    transport_options: dict[str, Any] = {}
    if settings.resolved_broker_url.startswith("filesystem"):
        # The embedded default: messages are files in the data directory, no server needed.
        queue_dir = settings.broker_folder / "queue"
        processed = settings.broker_folder / "processed"
        control = settings.broker_folder / "control"  # exchange tables; kombu's default is ./control
        for folder in (queue_dir, processed, control):
            folder.mkdir(parents=True, exist_ok=True)
        transport_options = {"data_folder_in": str(queue_dir), "data_folder_out": str(queue_dir),
                             "processed_folder": str(processed), "control_folder": str(control),
                             "store_processed": False}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=settings.train_queue,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache
def get_celery() -> Celery:
    """The application for the current settings (tests switch settings and clear this cache)."""
    return make_celery(get_settings())


def enqueue_job(job_id: str) -> bool:
    try:
        get_celery().send_task(TRAIN_TASK, args=[job_id], queue=get_settings().train_queue)
        return True
    except Exception as exc:  # broker down: the job stays queued in the database
        log.warning("could not enqueue %s (%s); the reconciler will retry", job_id, exc)
        return False


def enqueue_join(job_id: str, formation: int) -> bool:
    """Ask one more worker to join the gang forming for `job_id`'s attempt `formation`."""
    try:
        get_celery().send_task(JOIN_TASK, args=[job_id, formation], queue=get_settings().train_queue)
        return True
    except Exception as exc:  # the gang will not fill: it dissolves and the job waits queued
        log.warning("could not ask a worker to join %s (%s)", job_id, exc)
        return False


def broker_reachable() -> bool:
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False
