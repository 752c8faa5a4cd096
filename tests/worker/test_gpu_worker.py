"""What the worker's main process asks about its GPUs leaves CUDA usable in the pool processes it forks
for jobs. Marked `cuda`: skipped, with the reason, where torch sees no GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.cuda

# The main process's imports and questions, then a fork (as the prefork pool makes one per job) that
# uses CUDA.
FORK_AFTER_ASKING = """
import os, sys, torch
import worker.tasks  # all the worker's main process imports, and at worker_init the models' code
worker.tasks._import_job_code()
from app.core.config import get_settings
from worker.ranks import offered_devices, worker_kind
assert worker_kind() == "gpu" and offered_devices(get_settings()) >= 1
assert not torch.cuda.is_initialized()
pid = os.fork()
if pid == 0:
    try:
        ok = not torch.cuda._is_in_bad_fork() and torch.ones(2, device="cuda").sum().item() == 2
    except Exception as exc:  # "Cannot re-initialize CUDA in forked subprocess"
        print(exc, file=sys.stderr, flush=True)
        os._exit(4)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


def test_a_job_forked_after_the_worker_counted_its_gpus_can_use_cuda():
    done = subprocess.run([sys.executable, "-c", FORK_AFTER_ASKING], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
