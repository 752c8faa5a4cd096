"""Training workers' heartbeats, and who is alive: what failover, the reconciler and /readyz ask.

Each worker's main process writes its row every `worker_heartbeat_s` seconds; a
worker missing `DEAD_AFTER_BEATS` beats is dead. A job's holder (the pool
process that claimed it) is dead when its lease expired, when its worker is
dead, or, seen from the same machine, when its process is gone.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.models import Job, Worker, utcnow

DEAD_AFTER_BEATS = 3
FORGET_AFTER = timedelta(days=1)  # rows of workers that died without saying goodbye


def incarnation(node: str, pid: int) -> str:
    """A worker process's key: its Celery node name and its pid. A worker restarted under the same
    name is a new incarnation, so its heartbeats never vouch for the jobs the dead one held."""
    return f"{node}#{pid}"


def dead_after() -> timedelta:
    return timedelta(seconds=DEAD_AFTER_BEATS * get_settings().worker_heartbeat_s)


def beat(session: Session, node: str, queue: str, kind: str, *, holds_message: bool = False, devices: int = 1,
         address: str | None = None) -> None:
    """Record that `node` is alive (creating its row on the first beat), and whether it holds a message.

    A worker holding a message is not idle even before its pool process has claimed the job (which
    `set_job` records): on a busy machine that can take seconds, and the reconciler would take the
    message for lost and send it again. Once it holds none, its idle time starts."""
    now = utcnow()
    worker = session.get(Worker, node)
    if worker is None:
        session.add(Worker(node=node, hostname=socket.gethostname(), pid=os.getpid(), queue=queue, kind=kind,
                           started_at=now, last_seen_at=now, idle_since=None if holds_message else now,
                           devices=devices, address=address))
        return
    worker.last_seen_at, worker.pid, worker.queue = now, os.getpid(), queue
    worker.devices, worker.address = devices, address
    if holds_message:
        worker.idle_since = None
    elif worker.idle_since is None:
        worker.idle_since = now


def vouch(session: Session, node: str, queue: str, kind: str, devices: int = 1, address: str | None = None) -> None:
    """A worker claiming a job is alive, even when its first heartbeat has not landed yet: without
    its row the reconciler would take the job's holder for dead and send the job again."""
    if session.get(Worker, node) is None:
        beat(session, node, queue, kind, holds_message=True, devices=devices, address=address)


def set_job(session: Session, node: str, job_id: str | None) -> None:
    """The worker started (`job_id`) or finished (None) a job."""
    session.execute(update(Worker).where(Worker.node == node)
                    .values(job_id=job_id, idle_since=None if job_id else utcnow()))


def forget(session: Session, node: str) -> None:
    """A worker that shuts down cleanly takes its row with it."""
    session.execute(delete(Worker).where(Worker.node == node))


def forget_long_dead(session: Session, now: datetime) -> None:
    session.execute(delete(Worker).where(Worker.last_seen_at < now - FORGET_AFTER))


def live_workers(session: Session, now: datetime | None = None) -> list[Worker]:
    now = now or utcnow()
    return list(session.scalars(select(Worker).where(Worker.last_seen_at >= now - dead_after())))


def node_alive(session: Session, node: str, now: datetime) -> bool:
    worker = session.get(Worker, node)
    return worker is not None and worker.last_seen_at >= now - dead_after()


def process_alive(pid: int) -> bool:
    """Whether a process of this machine runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux): the signal said it exists
        return True


def owner_process(owner: str | None) -> tuple[str, int] | None:
    """(hostname, pid) of a lease owner `host:pid:thread`."""
    try:
        host, pid, _ = (owner or "").rsplit(":", 2)
        return host, int(pid)
    except ValueError:
        return None


def holder_dead(session: Session, job: Job, now: datetime, *, check_process: bool = True) -> bool:
    """Whether the process holding `job` is certainly gone, so the job can be taken over now.

    `check_process` looks for the holder's process when it ran on this machine: right for a
    worker about to claim the job, not for the reconciler, which leaves a pool process that
    died under a live worker to Celery's own redelivery (one message, not two)."""
    if job.lease_expires_at is None or job.lease_expires_at < now:
        return True
    if job.worker_node and not node_alive(session, job.worker_node, now):
        return True
    holder = owner_process(job.lease_owner)
    return check_process and holder is not None and holder[0] == socket.gethostname() and not process_alive(holder[1])
