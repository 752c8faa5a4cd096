"""The Celery worker's side: the training task (a thin wrapper that hands a job id to the runner), and
the worker's lifecycle: its heartbeat, and pool processes that die with it.

Start a worker with `celery -A worker.tasks worker` (`sbora worker` does).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Any

from celery.signals import (
    setup_logging,
    task_received,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from celery.worker import state as worker_state

from app import catalog, logs
from app.core.config import get_settings
from app.core.db import get_engine
from app.queue import JOIN_TASK, TRAIN_TASK, get_celery
from app.services.workers import incarnation
from sbora_core.method.models import import_model_code
from worker.evaluations import run_claimed_evaluation
from worker.heartbeat import WorkerHeartbeat
from worker.ranks import offered_devices, worker_address
from worker.runner import join_gang as join_gang_of
from worker.runner import run_job, worker_kind

# `celery -A worker.tasks` looks for this name.
celery = get_celery()
_heartbeat: WorkerHeartbeat | None = None
log = logging.getLogger(__name__)


@setup_logging.connect
def _structured_logs(**_: Any) -> None:
    """Celery leaves logging alone when this signal has a receiver: ours writes JSON lines."""
    logs.configure_logging()


@worker_init.connect
def _import_job_code(**_: Any) -> None:
    """Each job runs in a pool process forked from this one, a fresh one per job (--max-tasks-per-child 1):
    the offered models' transformers modules, which transformers imports lazily at a model's first
    load, are imported here once per worker instead of at every job's start (~1 s of CPU each)."""
    try:
        catalog.use_model_cache()
        import_model_code(catalog.offered().values())
    except Exception:  # a model the catalog cannot read fails its own jobs, clearly, later
        log.warning("could not import the offered models' code ahead of their jobs", exc_info=True)


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    queues = [q.name for q in sender.task_consumer.queues] if sender is not None else []
    _heartbeat = WorkerHeartbeat(incarnation(sender.hostname, os.getpid()),
                                 queues[0] if queues else get_settings().train_queue, worker_kind(),
                                 holds_messages=lambda: len(worker_state.reserved_requests) > 0,
                                 devices=offered_devices(get_settings()), address=worker_address(get_settings()))
    _heartbeat.start()


@task_received.connect
def _say_busy(**_: Any) -> None:
    """Runs in the main process as a message arrives, before the pool process claims its job."""
    if _heartbeat is not None:
        _heartbeat.message_received()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


@worker_process_init.connect
def _new_pool_process(**_: Any) -> None:
    """A forked pool process: its own database connections, and it dies with the worker."""
    # The heartbeat's connections came over with the fork; two processes on one connection corrupt
    # it (PostgreSQL: DuplicatePreparedStatement). Drop them here without closing them for the parent.
    get_engine().dispose(close=False)
    # A pool process whose worker was killed must not train on as an orphan (Linux: PR_SET_PDEATHSIG).
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


@celery.task(name=JOIN_TASK, acks_late=True, ignore_result=True, bind=True)
def join_gang(self: Any, job_id: str, formation: int) -> None:
    token = logs.job_id.set(job_id)
    try:
        join_gang_of(job_id, formation, node=incarnation(self.request.hostname or "", os.getppid()))
    finally:
        logs.job_id.reset(token)


@celery.task(name=TRAIN_TASK, acks_late=True, ignore_result=True, bind=True)
def train_job(self: Any, job_id: str) -> None:
    token = logs.job_id.set(job_id)  # every log line of this run carries the job id
    try:
        # This pool process's worker is its parent: the incarnation whose heartbeat vouches for it.
        run_job(job_id, node=incarnation(self.request.hostname or "", os.getppid()),
                runners={"evaluation": run_claimed_evaluation})
    finally:
        logs.job_id.reset(token)
