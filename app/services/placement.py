"""Where a job on several devices or machines can run: the devices live workers offer.

Workers report the devices they offer in their heartbeat (`Worker.devices`). A job asks for
`resources.devices` on each of `resources.nodes` machines: a request that no set of live workers
could ever run is refused (422 naming the field); one that has to wait for busy workers is
queued, with an event saying what it waits for. With no live worker at all nothing can be told
yet: the job waits, as any job does.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.errors import Invalid
from app.models import Worker
from app.services import workers
from sbora_core.training.job import Resources


def _queue_workers(session: Session, queue: str) -> list[Worker]:
    return [w for w in workers.live_workers(session) if w.queue == queue]


def _hosts(candidates: list[Worker], devices: int) -> set[str]:
    """The machines (by the address other machines reach them at) with a worker offering at least `devices`."""
    return {w.address or w.hostname for w in candidates if w.devices >= devices}


def check_resources(session: Session, resources: Resources, queue: str) -> str | None:
    """Invalid when no set of live workers could run `resources`; else what the job waits for
    (None: a free worker set exists now, or the job asks for no more than one device)."""
    if resources.world_size == 1:
        return None
    live = _queue_workers(session, queue)
    if not live:
        return f"waiting for workers: none is running on queue {queue}"
    most = max(w.devices for w in live)
    if resources.devices > most:
        raise Invalid("resources.devices", f"resources.devices: {resources.devices} devices on one machine, but the "
                                           f"live workers offer at most {most}; ask for {most} or fewer per node "
                                           "(and more nodes), or start workers with more devices")
    capable = _hosts(live, resources.devices)
    if resources.nodes > len(capable):
        raise Invalid("resources.nodes", f"resources.nodes: {resources.nodes} machines with {resources.devices} "
                                         f"devices each, but live workers offer that on {len(capable)}; "
                                         f"ask for {len(capable)} or fewer, or start workers on more machines")
    idle = _hosts([w for w in live if w.job_id is None and w.idle_since is not None], resources.devices)
    if len(idle) < resources.nodes:
        return (f"waiting for {resources.nodes} machine(s) with {resources.devices} free devices each; "
                f"{len(idle)} free now")
    return None
