"""The Celery worker's side: the training task, a thin wrapper that hands a job id to the runner.

Start a worker with `celery -A worker.tasks worker` (`sbora worker` does).
"""

from __future__ import annotations

from celery.signals import setup_logging

from app import logs
from app.queue import TRAIN_TASK, get_celery
from worker.runner import run_job

# `celery -A worker.tasks` looks for this name.
celery = get_celery()


@setup_logging.connect
def _structured_logs(**_) -> None:
    """Celery leaves logging alone when this signal has a receiver: ours writes JSON lines."""
    logs.configure_logging()


@celery.task(name=TRAIN_TASK, acks_late=True, ignore_result=True)
def train_job(job_id: str) -> None:
    token = logs.job_id.set(job_id)  # every log line of this run carries the job id
    try:
        run_job(job_id)
    finally:
        logs.job_id.reset(token)
