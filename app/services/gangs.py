"""Gangs: the workers of one job that spans several machines (`resources.nodes`), formed in the database.

A formation is the job's next attempt. The worker that takes the job's message leads it: it
claims slot 0 and publishes the rendezvous endpoint there, then sends one join message per other
slot. Each worker that takes a join message claims a free slot in one transaction; two slots of
one formation never go to one machine (a unique key), nor one slot to two workers. When the last
slot is claimed the leader starts the job (queued -> running, attempt = the formation) and every
member starts its ranks; a formation that does not fill in time is deleted whole, and the job
stays queued. No other state: the slots are rows beside the job's.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import GangSlot, Job, utcnow
from app.services import workers


def formation_of(job: Job) -> int:
    """The formation a queued job's gang forms for: its next attempt."""
    return job.attempts + 1


def lead(session: Session, job: Job, node: str, machine: str, endpoint: str) -> int:
    """Claim slot 0 of the job's next formation (flushes: IntegrityError if another worker leads it),
    after deleting what earlier formations left."""
    formation = formation_of(job)
    session.execute(delete(GangSlot).where(GangSlot.job_id == job.id, GangSlot.formation < formation))
    session.add(GangSlot(job_id=job.id, formation=formation, slot=0, worker_node=node, hostname=machine,
                         endpoint=endpoint))
    session.flush()
    return formation


def join(session: Session, job_id: str, formation: int, nodes: int, node: str, machine: str) -> int | None:
    """Claim the first free slot of a forming gang; None when it is full, gone, or already has a slot
    on this machine. Each try is its own savepoint: a slot taken meanwhile means trying the next."""
    job = session.get(Job, job_id)
    if job is None or job.status != "queued" or job.cancel_requested or formation_of(job) != formation:
        return None
    if not session.scalars(select(GangSlot).where(GangSlot.job_id == job_id, GangSlot.formation == formation,
                                                  GangSlot.slot == 0)).first():
        return None  # dissolved (or not formed yet): a join needs a leader
    for slot in range(1, nodes):
        try:
            with session.begin_nested():
                session.add(GangSlot(job_id=job_id, formation=formation, slot=slot, worker_node=node,
                                     hostname=machine))
            return slot
        except IntegrityError as exc:
            if "hostname" in str(exc.orig) or _machine_taken(session, job_id, formation, machine):
                return None
    return None


def _machine_taken(session: Session, job_id: str, formation: int, machine: str) -> bool:
    return session.scalars(select(GangSlot).where(GangSlot.job_id == job_id, GangSlot.formation == formation,
                                                  GangSlot.hostname == machine)).first() is not None


def members(session: Session, job_id: str, formation: int) -> list[GangSlot]:
    return list(session.scalars(select(GangSlot).where(GangSlot.job_id == job_id, GangSlot.formation == formation)
                                .order_by(GangSlot.slot)))


def dissolve(session: Session, job_id: str, formation: int) -> int:
    """Delete the formation's slots (a gang that did not fill, or that ended); how many there were."""
    done = session.execute(delete(GangSlot).where(GangSlot.job_id == job_id, GangSlot.formation == formation))
    return cast(CursorResult[Any], done).rowcount


def leave(session: Session, job_id: str, formation: int, node: str) -> None:
    session.execute(delete(GangSlot).where(GangSlot.job_id == job_id, GangSlot.formation == formation,
                                           GangSlot.worker_node == node))


def start(session: Session, job_id: str, formation: int, owner: str, node: str, lease_s: int) -> bool:
    """The full gang's job, queued -> running for attempt `formation`, leased by the leader `owner`."""
    now = utcnow()
    done = session.execute(update(Job).where(Job.id == job_id, Job.status == "queued",
                                             Job.cancel_requested.is_(False), Job.attempts == formation - 1)
                           .values(status="running", lease_owner=owner, worker_node=node, attempts=formation,
                                   lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
                           .execution_options(synchronize_session=False))
    if cast(CursorResult[Any], done).rowcount != 1:
        return False
    job = session.get(Job, job_id)
    if job is not None and job.started_at is None:
        job.started_at = now
    return True


def started(job: Job | None, formation: int) -> bool:
    return job is not None and job.status in ("running", "cancelling") and job.attempts == formation


def broken(session: Session, job_id: str, formation: int) -> str | None:
    """Why a started gang cannot go on (a member's worker stopped beating, the job moved on); None if it can."""
    job = session.get(Job, job_id)
    if not started(job, formation):
        return "the job is no longer this gang's (it ended, or was sent back to the queue)"
    now = utcnow()
    for member in members(session, job_id, formation):
        if not workers.node_alive(session, member.worker_node, now):
            return f"the worker of node {member.slot} ({member.hostname}) stopped"
    return None
