"""Celery tasks: thin wrappers that hand a job id to the runner."""

from __future__ import annotations

from app import logs
from worker.celery_app import celery
from worker.runner import run_job


@celery.task(name="sbora.train_job", acks_late=True, ignore_result=True)
def train_job(job_id: str) -> None:
    token = logs.job_id.set(job_id)  # every log line of this run carries the job id
    try:
        run_job(job_id)
    finally:
        logs.job_id.reset(token)
