"""One rank of a job on several ranks: what torchrun starts (`python -m sbora_core.training.rank RUN_DIR`).

It joins the job's process group, trains with `train(..., ranks=...)` and records how it ended
in the run directory (`launch.py` describes the files); rank 0 also writes the events and the
result. It dies with torchrun, and leaves at once after an error: a rank that waited for peers
to tear down would hold its device.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from sbora_core.training import distributed
from sbora_core.training.job import TrainJob
from sbora_core.training.launch import FileCallbacks, die_with_parent
from sbora_core.training.train import Callbacks, device_name, train


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "can't allocate memory" in str(exc)


def is_peer_failure(exc: BaseException) -> bool:
    """An error a collective raised because another rank went away (an echo, not a cause)."""
    text = str(exc)
    return isinstance(exc, torch.distributed.DistError) or any(
        phrase in text for phrase in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "timed out", "Timed out", "NCCL communicator was aborted"))


def record_end(run_dir: Path, rank: int, device: str, exc: BaseException | None,
               parameter_bytes: dict[str, int] | None = None) -> None:
    end: dict = {"rank": rank, "device": device, "ok": exc is None, "parameter_bytes": parameter_bytes}
    if exc is not None:
        kind = "out_of_memory" if is_out_of_memory(exc) else "peer" if is_peer_failure(exc) else "error"
        message = (f"rank {rank} ({device}) ran out of memory; lower batch_size or max_seq_len, use "
                   "gradient_checkpointing, or shard the base (resources.sharding: full)"
                   if kind == "out_of_memory" else f"rank {rank} ({device}): {type(exc).__name__}: {exc}"[:1500])
        end.update(kind=kind, error_type=type(exc).__name__, message=message)
    path = run_dir / "ranks" / f"{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(end))
    path.with_suffix(".tmp").rename(path)


def main(run_dir: Path) -> None:
    die_with_parent()
    spec = json.loads((run_dir / "job.json").read_text())
    job = TrainJob.from_dict(spec["job"])
    torch.set_num_threads(spec["threads"])
    ranks = distributed.join_ranks(job.resources.sharding, spec["step_timeout_s"], spec["setup_timeout_s"])
    (run_dir / "ranks" / f"{ranks.rank}.pid").write_text(str(os.getpid()))
    # Stopped by torchrun (a peer failed): say so, at the C level (this thread may be blocked in a
    # collective), then die as SIGTERM does. A rank that leaves no word at all was killed.
    faulthandler.register(signal.SIGTERM, open(run_dir / "ranks" / f"{ranks.rank}.stopped", "w"), chain=True)
    device = str(ranks.device) if ranks.device.type == "cpu" else f"{ranks.device}, {device_name(ranks.device)}"
    callbacks = FileCallbacks(run_dir) if ranks.is_writer else Callbacks()
    try:
        result = train(job, callbacks, resume=spec["resume"], ranks=ranks, step_timeout_s=spec["step_timeout_s"])
    except BaseException as exc:
        traceback.print_exc()
        record_end(run_dir, ranks.rank, device, exc)
        sys.stderr.flush()
        os._exit(1)  # no teardown: the process group's peers may be gone
    if ranks.is_writer:
        data = {**asdict(result), "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
                "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None}
        (run_dir / "result.tmp").write_text(json.dumps(data, default=str))
        (run_dir / "result.tmp").rename(run_dir / "result.json")
    record_end(run_dir, ranks.rank, device, None, result.metrics.get("rank_parameter_bytes"))
    distributed.leave_ranks()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
