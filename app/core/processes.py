"""Child processes: how engine processes start, and what a supervisor reports when one ends."""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterable
from multiprocessing.context import ForkServerContext, SpawnContext


def engine_start_context(models: Iterable[str]) -> SpawnContext | ForkServerContext:
    """How an engine process starts. Never by forking the API process: it holds threads (the server's,
    the database pool's), and a lock one of them held at the fork would stay held in the child.

    On a host without a GPU, engines fork from a forkserver: one single-threaded process that imported
    the engine's code and these models' modelling code once, when the first engine started. A spawned
    engine imports all of that again, ~3 s of CPU at every start or restart after a crash. A GPU host spawns each engine: an import in the forkserver could initialise CUDA, which
    a forked child cannot use. The forkserver keeps the environment it started with; an engine takes
    its settings from its arguments (EngineLimits), never from the environment."""
    import torch

    if torch.cuda.is_available():
        return multiprocessing.get_context("spawn")
    from sbora_core.method.models import model_code_modules

    context = multiprocessing.get_context("forkserver")
    # Read when the forkserver starts (the first engine); modules that fail to import are skipped.
    context.set_forkserver_preload(["app.engine_process", *model_code_modules(models)])
    return context


def exit_reason(code: int | None) -> str:
    """`killed by SIGKILL`, `exited with code 3`, or `still running`."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
