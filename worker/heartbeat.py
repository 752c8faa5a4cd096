"""The worker's heartbeat: a thread in the Celery main process that writes its row every few seconds.

It runs in the main process, not in the pool process training a job, so a
worker whose training process dies still beats (and Celery redelivers the
job's message), while a worker that dies whole stops beating and its jobs are
taken over after three missed beats.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from app.core.config import get_settings
from app.core.db import session_scope
from app.services import workers

log = logging.getLogger(__name__)


class WorkerHeartbeat(threading.Thread):
    """Beats every `worker_heartbeat_s`, and at once when a message arrives (`message_received`), so
    the row says the worker is busy before the reconciler's staleness window can run out.
    `holds_messages` tells whether the worker holds any message (received, running, not yet done)."""

    def __init__(self, node: str, queue: str, kind: str, holds_messages: Callable[[], bool], devices: int = 1,
                 address: str | None = None) -> None:
        super().__init__(daemon=True, name="worker-heartbeat")
        self.node, self.queue, self.kind = node, queue, kind
        self.devices, self.address = devices, address  # what it offers a job, and where other machines reach it
        self.holds_messages = holds_messages
        self.stop_event = threading.Event()
        self.wake = threading.Event()  # set by a message's arrival, and by stop

    def message_received(self) -> None:
        self.wake.set()

    def run(self) -> None:
        interval = get_settings().worker_heartbeat_s
        while True:
            # A wake-up counts as holding a message: it is sent just before the worker records the message.
            holds_message = self.wake.is_set()
            self.wake.clear()
            try:
                with session_scope() as session:
                    workers.beat(session, self.node, self.queue, self.kind,
                                 holds_message=holds_message or self.holds_messages(),
                                 devices=self.devices, address=self.address)
            except Exception:  # a database blip: the next beat tries again
                log.exception("heartbeat of %s failed", self.node)
            self.wake.wait(interval)
            if self.stop_event.is_set():
                return

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        self.join(timeout=5)
        try:
            with session_scope() as session:
                workers.forget(session, self.node)
        except Exception:
            log.exception("could not remove the heartbeat row of %s", self.node)
