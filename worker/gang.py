"""A job spanning several machines: how a worker leads or joins its gang (`app.services.gangs`).

The worker that takes the job's message leads: it claims slot 0 with a rendezvous endpoint on
its machine, sends a join message per other slot, and waits for the slots to fill. A worker
that takes a join message claims a free slot and waits for the leader to start the job. Once
started every member runs its machine's ranks (`worker.ranks`) with torchrun's c10d rendezvous
at the leader's endpoint; whichever machine holds rank 0 reports progress and checkpoints and
ends the job. A gang that does not fill within `gang_timeout_s` deletes its slots and the job
waits queued, with an event saying for what. While the job runs, each member watches the others'
heartbeats (`GangRole.broken`): a lost machine stops every rank within a few heartbeats.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError

from app.core.config import Settings
from app.core.db import session_scope
from app.models import LEASED_STATUSES, TERMINAL_STATUSES, Job, utcnow
from app.queue import enqueue_join
from app.services import gangs, workers
from app.services.jobs import add_event, add_event_once
from sbora_core.training.launch import Rendezvous
from worker import ranks

log = logging.getLogger(__name__)
POLL_S = 0.5
CAUSE_WAIT_S = 5.0  # how long the leader waits for a member to report its ranks' own error


@dataclass
class GangRole:
    """This worker's place in a started gang."""

    job_id: str
    formation: int
    slot: int
    nodes: int
    endpoint: str
    address: str

    @property
    def leads(self) -> bool:
        return self.slot == 0

    def rendezvous(self) -> Rendezvous:
        return Rendezvous(endpoint=self.endpoint, run_id=f"{self.job_id}-{self.formation}", nodes=self.nodes,
                          is_host=self.leads, local_addr=self.address)

    def broken(self) -> str | None:
        with session_scope() as session:
            return gangs.broken(session, self.job_id, self.formation)

    def await_cause(self) -> bool:
        """After a peer's failure: whether a member ended the job meanwhile (with its ranks' own error)."""
        deadline = time.monotonic() + CAUSE_WAIT_S
        while time.monotonic() < deadline:
            with session_scope() as session:
                job = session.get(Job, self.job_id)
                if not gangs.started(job, self.formation):
                    return True
            time.sleep(POLL_S)
        return False

    def leave(self, node: str) -> None:
        with session_scope() as session:
            gangs.leave(session, self.job_id, self.formation, node)


def spans_machines(job_id: str) -> bool:
    with session_scope() as session:
        job = session.get(Job, job_id)
        return job is not None and ranks.job_resources(job.resources).nodes > 1


def _endpoint(address: str) -> str:
    """host:port for the rendezvous store on this machine (a port free now)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return f"{address}:{probe.getsockname()[1]}"


def lead(job_id: str, node: str, owner: str, settings: Settings) -> GangRole | None:
    """Form the job's next gang with this worker as node 0; its role once the gang started, None if
    it did not (the job is not waiting, or the gang did not fill in time)."""
    address, offered = ranks.worker_address(settings), ranks.offered_devices(settings)
    try:
        with session_scope() as session:
            job = session.get(Job, job_id)
            if job is None or job.cancel_requested or job.status in TERMINAL_STATUSES:
                return None
            resources = ranks.job_resources(job.resources)
            if job.status in LEASED_STATUSES:
                if not workers.holder_dead(session, job, utcnow(), check_process=False):
                    return None  # its gang runs
                job.status, job.lease_owner, job.lease_expires_at, job.worker_node = "queued", None, None, None
                add_event(session, job_id, "status", "queued: its gang lost its node 0; forming a new one",
                          {"status": "queued"})
            if offered < resources.devices:
                return None  # the leader needs the devices too; the reconciler sends the job again
            workers.vouch(session, node, settings.train_queue, ranks.worker_kind(), offered, address)
            formation = gangs.lead(session, job, node, address, _endpoint(address))
    except IntegrityError:  # another worker leads this formation
        return None
    log.info("forming a gang of %d machines for %s (attempt %d); node 0 is %s", resources.nodes, job_id, formation,
             address)
    for _ in range(resources.nodes - 1):
        enqueue_join(job_id, formation)
    return _wait_for_gang(job_id, formation, resources.nodes, resources.devices, node, owner, address, settings)


def _wait_for_gang(job_id: str, formation: int, nodes: int, devices: int, node: str, owner: str, address: str,
                   settings: Settings) -> GangRole | None:
    deadline = time.monotonic() + settings.gang_timeout_s
    while True:
        with session_scope() as session:
            job = session.get(Job, job_id)
            members = gangs.members(session, job_id, formation)
            if job is None or job.cancel_requested or job.status != "queued":
                gangs.dissolve(session, job_id, formation)
                return None
            if len(members) == nodes:
                if not gangs.start(session, job_id, formation, owner, node, settings.job_lease_s):
                    gangs.dissolve(session, job_id, formation)
                    return None
                add_event(session, job_id, "status", f"running (attempt {formation}) on a gang of {nodes} machines: "
                          + ", ".join(m.hostname for m in members),
                          {"status": "running", "attempt": formation, "gang": [m.hostname for m in members]})
                workers.set_job(session, node, job_id)
                return GangRole(job_id, formation, 0, nodes, members[0].endpoint or "", address)
            if time.monotonic() > deadline:
                gangs.dissolve(session, job_id, formation)
                add_event_once(session, job_id, "log", f"queued: waiting for {nodes} machines with {devices} free devices "
                                                  f"each; {len(members)} joined within {settings.gang_timeout_s:g} s",
                          {"waiting_for": "gang", "joined": len(members), "nodes": nodes})
                return None
        time.sleep(POLL_S)


def join(job_id: str, formation: int, node: str, settings: Settings) -> GangRole | None:
    """Take a slot of the forming gang and wait for its start; None if there was none to take here
    (the message goes on to another machine while the gang forms) or the gang did not start."""
    address, offered = ranks.worker_address(settings), ranks.offered_devices(settings)
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        resources = ranks.job_resources(job.resources)
        slot = gangs.join(session, job_id, formation, resources.nodes, node, address) \
            if offered >= resources.devices else None
        still_forming = slot is None and gangs.members(session, job_id, formation) \
            and len(gangs.members(session, job_id, formation)) < resources.nodes
        if slot is not None:
            workers.vouch(session, node, settings.train_queue, ranks.worker_kind(), offered, address)
    if slot is None:
        if still_forming:  # a worker on another machine may take it
            time.sleep(2.0)
            enqueue_join(job_id, formation)
        return None
    deadline = time.monotonic() + settings.gang_timeout_s + 30
    while time.monotonic() < deadline:
        with session_scope() as session:
            job = session.get(Job, job_id)
            members = gangs.members(session, job_id, formation)
            if gangs.started(job, formation):
                workers.set_job(session, node, job_id)
                return GangRole(job_id, formation, slot, resources.nodes, members[0].endpoint or "", address)
            if not any(m.worker_node == node for m in members) or job is None or job.status != "queued":
                gangs.leave(session, job_id, formation, node)
                return None  # dissolved, cancelled, or started without this worker
        time.sleep(POLL_S)
    with session_scope() as session:
        gangs.leave(session, job_id, formation, node)
    return None
