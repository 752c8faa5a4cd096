"""Helpers shared by the benchmarks: a live server on the default model in a scratch data directory, and
timing on a device whose kernels run asynchronously."""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


@contextmanager
def serve_default_model() -> Iterator[tuple[str, str]]:
    """(url, api key) of the app under uvicorn on a free loopback port, with a fresh SQLite database."""
    import uvicorn

    with tempfile.TemporaryDirectory() as data_dir:
        os.environ["SBORA_DATA_DIR"] = data_dir
        for var in ("SBORA_DATABASE_URL", "SBORA_BROKER_URL", "SBORA_MODELS"):
            os.environ.pop(var, None)
        from app.core.db import session_scope
        from app.core.security import create_api_key
        from app.main import create_app
        from app.migrate import upgrade_database

        upgrade_database()
        with session_scope() as session:
            _, key = create_api_key(session, "bench")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}", key
        finally:
            server.should_exit = True
            thread.join(timeout=60)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
