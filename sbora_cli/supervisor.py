"""`sbora serve`'s process supervision: a child that exits is started again, with backoff, and the log says why.

A child that ran for `STABLE_S` before it died is restarted at once; one that
keeps dying waits 1, 2, 4 ... up to `MAX_BACKOFF_S` seconds between starts, so
a broken configuration does not spin.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from app.core.processes import exit_reason

log = logging.getLogger("sbora.supervisor")
STABLE_S = 60.0
MAX_BACKOFF_S = 30.0


class Supervised(threading.Thread):
    """Keeps one child process running until `stop()`; `start_child` starts it (a Popen)."""

    def __init__(self, name: str, start_child: Callable[[], subprocess.Popen]) -> None:
        super().__init__(daemon=True, name=f"supervise-{name}")
        self.child_name, self.start_child = name, start_child
        self.stopping = threading.Event()
        self.child: subprocess.Popen | None = None
        self.restarts = 0

    def run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            self.child = self.start_child()
            code = self.child.wait()  # also reaps it: no zombie left behind
            if self.stopping.is_set():
                return
            failures = 0 if time.monotonic() - started >= STABLE_S else failures + 1
            delay = 0.0 if failures == 0 else min(MAX_BACKOFF_S, 2.0 ** (failures - 1))
            log.error("the %s process (pid %s) %s; starting it again in %.0f s", self.child_name, self.child.pid,
                      exit_reason(code), delay)
            self.restarts += 1
            if self.stopping.wait(delay):
                return

    def stop(self, timeout: float = 30.0) -> None:
        """Stop supervising, then end the child: SIGTERM, and SIGKILL if it is not gone in `timeout`."""
        self.stopping.set()
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.join(timeout=5)
