"""The worker's heartbeat: a thread in the Celery main process that writes its row every few seconds.

It runs in the main process, not in the pool process training a job, so a
worker whose training process dies still beats (and Celery redelivers the
job's message), while a worker that dies whole stops beating and its jobs are
taken over after three missed beats.
"""

from __future__ import annotations

import logging
import threading

from app.core.config import get_settings
from app.core.db import session_scope
from app.services import workers

log = logging.getLogger(__name__)


class WorkerHeartbeat(threading.Thread):
    def __init__(self, node: str, queue: str, kind: str) -> None:
        super().__init__(daemon=True, name="worker-heartbeat")
        self.node, self.queue, self.kind = node, queue, kind
        self.stop_event = threading.Event()

    def run(self) -> None:
        interval = get_settings().worker_heartbeat_s
        while True:
            try:
                with session_scope() as session:
                    workers.beat(session, self.node, self.queue, self.kind)
            except Exception:  # a database blip: the next beat tries again
                log.exception("heartbeat of %s failed", self.node)
            if self.stop_event.wait(interval):
                return

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=5)
        try:
            with session_scope() as session:
                workers.forget(session, self.node)
        except Exception:
            log.exception("could not remove the heartbeat row of %s", self.node)
