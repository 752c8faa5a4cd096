"""Running one job: claim it, train with callbacks that write to the database, register the adapter.

A job never runs twice at once: a worker claims it with a conditional UPDATE
(queued, or running with an expired lease) and keeps the lease alive from a
heartbeat thread. Checkpoints live in the artifact store under `jobs/<id>/`, so
whichever worker claims the job next resumes from the last one.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import torch
from sqlalchemy import CursorResult, Update, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import catalog
from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.errors import without_paths
from app.models import LEASED_STATUSES, Dataset, Job, utcnow
from app.queue import enqueue_job
from app.services import groups, workers
from app.services.adapters import register_adapter, register_checkpoint
from app.services.evaluations import queue_eval_after
from app.services.jobs import add_event
from app.services.objectives import start_adapter
from app.storage import ArtifactStore, StorageUnavailable, get_store
from sbora_core.method.adapter_io import AdapterFormatError
from sbora_core.method.config import SBoRAConfig
from sbora_core.method.models import UnknownModelError
from sbora_core.training.data import DatasetError
from sbora_core.training.job import Hyperparameters, TrainJob
from sbora_core.training.launch import RankFailure
from sbora_core.training.train import Callbacks, Progress
from worker import gang, job_files, queueing, ranks
from worker.gang import GangRole
from worker.ranks import worker_kind

log = logging.getLogger(__name__)
PROGRESS_WRITE_INTERVAL_S = 1.0


class DatasetMissing(LookupError):
    """A dataset the job needs was deleted after the job was queued."""


def worker_name() -> str:
    """The lease owner: this machine, process and thread."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def rows_updated(session: Session, statement: Update) -> int:
    """Run an UPDATE; how many rows it changed (the conditional updates below decide ownership)."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


def claim(job_id: str, owner: str, node: str, lease_s: int) -> bool:
    """Atomically take the job if it is queued, or running under a holder that is certainly dead
    (lease expired, its worker silent, or its process gone from this machine): a killed worker's
    job is taken over at once, not after its whole lease."""
    now = utcnow()
    if node:
        try:
            with session_scope() as session:
                workers.vouch(session, node, get_settings().train_queue, worker_kind(),
                              ranks.offered_devices(get_settings()), ranks.worker_address(get_settings()))
        except IntegrityError:  # its first heartbeat landed meanwhile
            pass
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.cancel_requested:
            return False
        if job.status == "queued":
            takeable = Job.status == "queued"
        elif job.status == "running" and workers.holder_dead(session, job, now):
            # Compare-and-swap on the dead holder: of several claimants exactly one wins.
            takeable = (Job.status == "running") & (Job.lease_owner == job.lease_owner)
        else:
            return False
        previous = job.lease_owner
        taken = rows_updated(session, update(Job)
                             .where(Job.id == job_id, Job.cancel_requested.is_(False), takeable)
                             .values(status="running", lease_owner=owner, worker_node=node,
                                     lease_expires_at=now + timedelta(seconds=lease_s),
                                     attempts=Job.attempts + 1, updated_at=now)
                             .execution_options(synchronize_session=False))
        if taken != 1:
            return False
        session.refresh(job)
        if job.started_at is None:
            job.started_at = now
        took_over = f", taking over from {previous}" if previous else ""
        add_event(session, job_id, "status", f"running (attempt {job.attempts}) on {node or owner}{took_over}",
                  {"status": "running", "attempt": job.attempts, "worker": node or owner})
        if node:
            workers.set_job(session, node, job_id)
    return True


def renew_lease(job_id: str, owner: str, lease_s: int) -> bool:
    with session_scope() as session:
        return rows_updated(session, update(Job)
                            .where(Job.id == job_id, Job.lease_owner == owner,
                                   Job.status.in_(LEASED_STATUSES))
                            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))) == 1


class Heartbeat(threading.Thread):
    """Renews the lease while training runs; notes when it was lost to another worker."""

    def __init__(self, job_id: str, owner: str, lease_s: int) -> None:
        super().__init__(daemon=True, name=f"lease-{job_id}")
        self.job_id, self.owner, self.lease_s = job_id, owner, lease_s
        self.stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        while not self.stop_event.wait(self.lease_s / 4):
            try:
                if not renew_lease(self.job_id, self.owner, self.lease_s):
                    self.lost = True
                    return
            except Exception:  # a database blip: try again next beat, the lease has slack
                log.exception("lease renewal for %s failed", self.job_id)


class DatabaseCallbacks(Callbacks):
    """sbora_core.training.train callbacks that record progress and events on the job row."""

    def __init__(self, job_id: str, heartbeat: Heartbeat, store: ArtifactStore) -> None:
        self.job_id = job_id
        self.heartbeat = heartbeat
        self.store = store
        self.pending: list[tuple[str, str, dict[str, Any]]] = []
        self.progress: dict[str, Any] | None = None
        self.last_write = 0.0

    def _flush(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_write < PROGRESS_WRITE_INTERVAL_S:
            return
        with session_scope() as session:
            for kind, message, data in self.pending:
                add_event(session, self.job_id, kind, message, data)
            if self.progress is not None:
                session.execute(update(Job).where(Job.id == self.job_id).values(progress=self.progress,
                                                                                  updated_at=utcnow()))
        self.pending.clear()
        self.last_write = time.monotonic()

    def on_progress(self, p: Progress) -> None:
        self.progress = {k: getattr(p, k) for k in ("step", "total_steps", "epoch", "loss", "learning_rate",
                                                    "tokens", "tokens_per_s", "elapsed_s", "eta_s")}
        self.pending.append(("metric", "", {"step": p.step, "loss": p.loss, "learning_rate": p.learning_rate,
                                            "tokens_per_s": p.tokens_per_s, **p.metrics}))
        self._flush(force=p.step == p.total_steps)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.pending.append(("eval", f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                             {"step": step, **metrics}))
        self._flush(force=True)

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any] | None = None) -> None:
        """Record the checkpoint with its metrics (train_*, valid_*, as OpenAI names them) and register
        it as an adapter, servable as `ft:...:ckpt-step-N`."""
        recorded = dict(metrics or {"step": step})
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            keep = int(job.hyperparameters.get("keep_checkpoints", 2))
            stale = register_checkpoint(session, job, step, path, self.store, keep, recorded)
        job_files.publish_checkpoint(self.store, self.job_id, path, keep)
        for key in stale:
            self.store.delete(key)
        self.pending.append(("checkpoint", f"checkpoint at step {step}", recorded))
        self._flush(force=True)

    def on_log(self, message: str) -> None:
        log.info("%s", message)  # also in the worker's own log (paths included), tagged with the job id
        self.pending.append(("log", without_paths(message), {}))
        self._flush()

    def should_cancel(self) -> bool:
        if self.heartbeat.lost:
            return True
        with session_scope() as session:
            job = session.get(Job, self.job_id)
            return job is None or job.cancel_requested

    def close(self) -> None:
        if self.pending or self.progress is not None:
            self._flush(force=True)


def classify_error(exc: BaseException) -> tuple[str, str]:
    """A stable error code and a message a user can act on (no traceback)."""
    if isinstance(exc, RankFailure):
        return ranks.failure_outcome(exc)
    if isinstance(exc, DatasetError):
        return "invalid_dataset", str(exc)
    if isinstance(exc, StorageUnavailable):
        return "storage_unavailable", f"{exc}; create the job again once the artifact store answers"
    if isinstance(exc, UnknownModelError):
        return "unknown_model", str(exc)
    if isinstance(exc, FloatingPointError):
        return "training_diverged", str(exc)
    if isinstance(exc, torch.OutOfMemoryError | MemoryError) or "can't allocate memory" in str(exc):
        return "out_of_memory", "ran out of memory; lower batch_size or max_seq_len, or use quantization nf4"
    disk_errnos = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    # Writers like safetensors report the OS error only in their message ("... (os error 28)").
    if (isinstance(exc, OSError) and exc.errno in disk_errnos) or any(
            f"os error {n})" in str(exc) for n in disk_errnos):
        return "disk_full", "the artifact store ran out of space (or a file size limit); free space and retry"
    if isinstance(exc, AdapterFormatError | ValueError):
        return "invalid_configuration", str(exc)[:1000]
    return "internal_error", f"{type(exc).__name__}: {str(exc)[:500]}"


def _finish(job_id: str, owner: str, status: str, message: str, **values: Any) -> None:
    if values.get("error_message"):
        values["error_message"] = without_paths(values["error_message"])
    with session_scope() as session:
        finished = rows_updated(session, update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                                           Job.status.in_(LEASED_STATUSES))
                                .values(status=status, finished_at=utcnow(), lease_expires_at=None,
                                        updated_at=utcnow(), **values))
        if finished == 1:
            add_event(session, job_id, "status", message, {"status": status, **{k: v for k, v in values.items()
                                                                                if k.startswith("error")}})
            # A group slot stays with the adapter; a job that ends without one gives it back.
            if values.get("adapter_id"):
                groups.keep(session, job_id, values["adapter_id"])
            else:
                groups.release_job(session, job_id)


def build_train_job(job: Job, train_path: str, val_path: str | None, output_dir: str,
                    init_adapter: str | None = None) -> TrainJob:
    objective = {"type": "sft", **(job.objective or {})}  # {} in rows older than objectives: sft
    return TrainJob(base_model=catalog.source_of(job.base_model), train_file=train_path, val_file=val_path,
                    output_dir=output_dir, sbora=SBoRAConfig(**job.method),
                    hyperparameters=Hyperparameters(**job.hyperparameters),
                    resources=ranks.job_resources(job.resources), quantization=job.quantization,
                    objective=objective["type"], beta=objective.get("beta", 0.1),
                    loss=objective.get("loss", "sigmoid"), init_adapter=init_adapter)


def orphaned_job(exclude: str) -> str | None:
    """A running job whose holder is dead (the oldest), other than `exclude`."""
    now = utcnow()
    with session_scope() as session:
        running = session.scalars(select(Job).where(Job.status == "running", Job.id != exclude,
                                                    Job.cancel_requested.is_(False)).order_by(Job.updated_at))
        return next((job.id for job in running if ranks.job_resources(job.resources).nodes == 1
                     and workers.holder_dead(session, job, now)), None)


ClaimedRunner = Callable[[str, str, Settings, ArtifactStore], "str | None"]


def run_job(job_id: str, node: str = "", runners: dict[str, ClaimedRunner] | None = None) -> str | None:
    """Run the job if this worker (Celery node `node`) can claim it; returns its final status, or
    None if not claimed. Training jobs run here; `runners` runs other kinds once claimed (the
    evaluation runner, `worker.evaluations`, stands on this module's lease and finish helpers).

    A dead worker's job goes first: its message sits behind every queued job, but it was admitted
    long ago and has work to lose. So before taking `job_id`, a worker takes over any orphaned
    job, and sends `job_id`'s message back for another worker."""
    settings, store = _prepare_process()
    owner = worker_name()
    if gang.spans_machines(job_id):  # this worker leads the job's gang (it forms a new one if it lost one)
        role = gang.lead(job_id, node, owner, settings)
        return _run_part(job_id, owner, settings, store, role, node) if role else None
    if not queueing.fits_here(job_id, worker_name(), ranks.offered_devices(settings)):
        return None
    orphan = orphaned_job(exclude=job_id)
    if orphan is not None and claim(orphan, owner, node, settings.job_lease_s):
        _send_back(job_id, orphan)
        job_id = orphan
    elif not claim(job_id, owner, node, settings.job_lease_s):
        _cancel_if_requested(job_id)
        return None
    try:
        kind = _kind_of(job_id)
        run = _run_claimed if kind == "train" else (runners or {}).get(kind)
        if run is None:
            raise RuntimeError(f"job {job_id} is of kind {kind!r}, which this worker cannot run")
        return run(job_id, owner, settings, store)
    finally:
        if node:
            with session_scope() as session:
                workers.set_job(session, node, None)


def _kind_of(job_id: str) -> str:
    with session_scope() as session:
        job = session.get(Job, job_id)
        return job.kind if job is not None else "train"


def _prepare_process() -> tuple[Settings, ArtifactStore]:
    settings = get_settings()
    catalog.use_model_cache()
    torch.set_num_threads(settings.resolved_torch_threads)
    if os.getpriority(os.PRIO_PROCESS, 0) < settings.worker_nice:  # only ever lower our priority
        os.setpriority(os.PRIO_PROCESS, 0, settings.worker_nice)
    return settings, get_store()


def join_gang(job_id: str, formation: int, node: str) -> str | None:
    """Take a slot of the gang forming for `job_id` and run this machine's part once it starts."""
    settings, store = _prepare_process()
    role = gang.join(job_id, formation, node, settings)
    if role is None:
        return None
    with session_scope() as session:
        job = session.get(Job, job_id)
        leader = job.lease_owner if job is not None else None
    # The job's lease is the leader's: this member ends the job under it when its machine holds rank 0.
    return _run_part(job_id, leader or "", settings, store, role, node)


def _run_part(job_id: str, owner: str, settings: Settings, store: ArtifactStore, role: GangRole,
              node: str) -> str | None:
    try:
        return _run_claimed(job_id, owner, settings, store, role, node)
    finally:
        if node:
            with session_scope() as session:
                workers.set_job(session, node, None)


def _run_claimed(job_id: str, owner: str, settings: Settings, store: ArtifactStore, role: GangRole | None = None,
                 node: str = "") -> str | None:
    heartbeat = Heartbeat(job_id, owner, settings.job_lease_s)
    if role is None or role.leads:  # a gang's lease is its leader's
        heartbeat.start()
    callbacks = DatabaseCallbacks(job_id, heartbeat, store)
    callbacks.on_log(f"{torch.get_num_threads()} torch threads at nice {os.getpriority(os.PRIO_PROCESS, 0)}")
    output_dir = job_files.job_dir(store, job_id, settings)
    keep_scratch = succeeded = False
    try:
        if restored := job_files.restore_checkpoint(store, job_id, output_dir, only=role is not None):
            callbacks.on_log(f"fetched {restored} from the artifact store")
        spec = _train_job_of(job_id, store, output_dir)
        result = ranks.run_training(spec, callbacks, settings, job_id, rendezvous=role.rendezvous() if role else None,
                                    abort=role.broken if role else None)
        callbacks.close()
        if result is None:  # rank 0 ran on another machine of the gang, whose worker ends the job
            return None
        if heartbeat.lost:
            log.warning("lease on %s lost; leaving the job to its new owner", job_id)
            return None
        if result.status == "cancelled":
            _finish(job_id, owner, "cancelled", f"cancelled at step {result.metrics['steps']}")
            return "cancelled"
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None and result.adapter_dir is not None
            adapter = register_adapter(session, job, result.adapter_dir, store)
            session.flush()
            adapter_id = adapter.id
        _finish(job_id, owner, "succeeded", f"succeeded: adapter {adapter_id}", adapter_id=adapter_id)
        log.info("succeeded", extra={"adapter_id": adapter_id, "steps": result.metrics.get("steps")})
        queue_eval_after(job_id, adapter_id)
        succeeded = True  # its checkpoints are no longer needed
        return "succeeded"
    except RankFailure as exc:
        log.warning("job %s: %s", job_id, exc)
        callbacks.close()
        if exc.kind in ("died", "aborted"):
            keep_scratch = True  # its checkpoints are here, for whichever worker resumes it
            # A gang's leader sends the job back, unless a member ends it with its ranks' own error first.
            if role is None or (role.leads and not role.await_cause()):
                queueing.requeue(job_id, owner, f"queued: {exc}", {"status": "queued", "rank": exc.rank})
            return "queued"
        code, message = classify_error(exc)
        _finish(job_id, owner, "failed", f"failed: {code}", error_code=code, error_message=message)
        return "failed"
    except DatasetMissing as exc:
        callbacks.close()
        _finish(job_id, owner, "failed", str(exc), error_code="dataset_missing",
                error_message=f"{exc}; upload it again and create a new job")
        return "failed"
    except StorageUnavailable as exc:
        log.warning("job %s: the artifact store is unavailable: %s", job_id, exc)
        callbacks.close()
        if queueing.wait_for_store(job_id, owner, settings, exc):
            keep_scratch = True  # this worker may well take it again: its checkpoints are here
            return "queued"
        code, message = classify_error(exc)
        _finish(job_id, owner, "failed", f"failed: {code}", error_code=code, error_message=message)
        return "failed"
    except Exception as exc:
        log.exception("job %s failed", job_id)
        try:
            callbacks.close()
        except Exception:
            log.exception("could not flush events of %s", job_id)
        code, message = classify_error(exc)
        _finish(job_id, owner, "failed", f"failed: {code}", error_code=code, error_message=message)
        return "failed"
    finally:
        heartbeat.stop_event.set()
        if role is not None:
            role.leave(node)
        # With a remote store, what a failed job leaves is in the store (a local one is the store).
        if not keep_scratch:
            try:
                job_files.discard(store, job_id, output_dir, stored_too=succeeded)
            except Exception:  # leftovers cost space, never the job's outcome
                log.exception("could not remove the files of %s", job_id)


def _train_job_of(job_id: str, store: ArtifactStore, output_dir: Path) -> TrainJob:
    """The job row as sbora_core's TrainJob, its datasets as files; DatasetMissing if one was deleted."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        paths: list[str | None] = []
        for dataset_id in (job.train_dataset_id, job.val_dataset_id):
            dataset = session.get(Dataset, dataset_id) if dataset_id else None
            if dataset_id and dataset is None:
                raise DatasetMissing(f"dataset {dataset_id} was deleted")
            paths.append(str(store.local_file(dataset.storage_key, dataset.sha256)) if dataset else None)
        assert paths[0] is not None
        return build_train_job(job, paths[0], paths[1], str(output_dir), start_adapter(session, job, store))


def _send_back(job_id: str, taken_instead: str) -> None:
    """Put a queued job's message back on the broker: this worker took over `taken_instead`."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "queued":
            return
    if enqueue_job(job_id):
        log.info("sent %s back to the queue; resuming the orphaned %s first", job_id, taken_instead)


def _cancel_if_requested(job_id: str) -> None:
    """A queued job whose cancel arrived while its message waited: make sure it ends cancelled."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is not None and job.status == "queued" and job.cancel_requested:
            job.status, job.finished_at = "cancelled", utcnow()
            add_event(session, job_id, "status", "cancelled before it started", {"status": "cancelled"})
