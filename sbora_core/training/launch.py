"""A job on several ranks: started with torch.distributed's elastic launcher, watched from outside.

`train_on_ranks` runs `python -m torch.distributed.run ... -m sbora_core.training.rank RUN_DIR`
(torchrun: c10d rendezvous, `--standalone` on one machine) and talks to the ranks through files
of the run directory, so the caller's `Callbacks` (a database, a console) work as for one process:
- `job.json`: the TrainJob and the launch settings, read by every rank;
- `events.jsonl`: rank 0's callbacks, one JSON object a line, replayed on the caller's callbacks;
- `acks/checkpoint-N`: the caller took checkpoint N (rank 0 waits for it, as one process would);
- `cancel`: made when the caller's `should_cancel` says so; rank 0 reads it at its next step
  and every rank stops there (rank 0 checkpoints first);
- `result.json`: rank 0's result; `ranks/R.json`: how rank R ended, `ranks/R.stopped`: torchrun
  stopped it (a peer had failed), neither: it was killed; `ranks/R.pid`: its process, so that
  nothing outlives the run.

torchrun tears every local rank down when one fails; the ranks' collectives give up after
`step_timeout_s` (a dead peer on another machine), and `abort` (the caller's view of the other
machines) stops them at once. Torchrun and every rank die with the process that started them.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sbora_core.training.job import TrainJob
from sbora_core.training.train import Callbacks, Progress, TrainResult

POLL_S = 0.2
CALLBACK_POLL_S = 1.0  # should_cancel and abort may ask a database: once a second is enough


@dataclass
class Rendezvous:
    """torchrun's c10d rendezvous for a job spanning several machines."""

    endpoint: str  # host:port of the rendezvous store, on node 0's machine
    run_id: str  # the same on every node of one start, new for every start
    nodes: int
    is_host: bool  # node 0 hosts the store
    local_addr: str | None = None  # this machine's address as the other nodes reach it


@dataclass
class LaunchSettings:
    devices: int  # ranks on this machine
    rendezvous: Rendezvous | None = None  # None: one machine (`--standalone`)
    step_timeout_s: float = 60.0  # a training collective waits this long for a peer
    setup_timeout_s: float = 900.0  # ranks wait this long for each other while loading the base
    threads_per_rank: int = 1
    cancel_grace_s: float = 300.0  # after a cancel, how long the ranks may take to checkpoint and stop
    env: dict[str, str] = field(default_factory=dict)


class RankFailure(RuntimeError):
    """The job's ranks stopped without a result: one raised an error, died, or was stopped from outside.

    `kind`: out_of_memory, error (an exception: `error_type`), died (killed, or its machine lost:
    the job can resume from its last checkpoint) or aborted (`abort` said so)."""

    def __init__(self, kind: str, message: str, rank: int | None = None, device: str | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.rank, self.device, self.error_type = kind, rank, device, error_type


# -- the run directory ------------------------------------------------------------------------------
def _append_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def ack_file(run_dir: Path, step: int) -> Path:
    return run_dir / "acks" / f"checkpoint-{step}"


class FileCallbacks(Callbacks):
    """Rank 0's callbacks: every event a line of `events.jsonl`; a cancel is the `cancel` file.

    A checkpoint waits until the caller has taken it (`acks/checkpoint-N`), as it would in one
    process: the caller may copy or register it, and the next checkpoints must not delete it first."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.events = run_dir / "events.jsonl"
        self.cancel_file = run_dir / "cancel"

    def on_progress(self, progress: Progress) -> None:
        _append_line(self.events, {"kind": "progress", **asdict(progress)})

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        _append_line(self.events, {"kind": "eval", "step": step, "metrics": metrics})

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any] | None = None) -> None:
        _append_line(self.events, {"kind": "checkpoint", "step": step, "path": str(path), "metrics": metrics})
        while not ack_file(self.run_dir, step).exists():  # the caller died? Then so does this rank
            time.sleep(0.05)

    def on_log(self, message: str) -> None:
        _append_line(self.events, {"kind": "log", "message": message})

    def should_cancel(self) -> bool:
        return self.cancel_file.exists()


def replay(record: dict[str, Any], callbacks: Callbacks) -> None:
    kind = record.pop("kind")
    if kind == "progress":
        callbacks.on_progress(Progress(**record))
    elif kind == "eval":
        callbacks.on_eval(record["step"], record["metrics"])
    elif kind == "checkpoint":
        callbacks.on_checkpoint(record["step"], Path(record["path"]), record.get("metrics"))
    elif kind == "log":
        callbacks.on_log(record["message"])


class EventTail:
    """Reads the complete lines rank 0 appended since the last read; acknowledges checkpoints once
    their callback returned."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path, self.offset, self.last_step = run_dir, run_dir / "events.jsonl", 0, 0

    def forward(self, callbacks: Callbacks) -> int:
        """Replay the new events on `callbacks`; how many there were."""
        count = 0
        try:
            with open(self.path) as handle:
                handle.seek(self.offset)
                while (line := handle.readline()).endswith("\n"):
                    self.offset = handle.tell()
                    record = json.loads(line)
                    if record["kind"] == "progress":
                        self.last_step = record["step"]
                    checkpoint = record["step"] if record["kind"] == "checkpoint" else None
                    replay(record, callbacks)
                    if checkpoint is not None:
                        ack_file(self.run_dir, checkpoint).touch()
                    count += 1
        except FileNotFoundError:
            pass
        return count


def die_with_parent() -> None:
    """Be killed when the parent process dies (Linux), however it dies: no rank outlives its job."""
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the call
            os.kill(os.getpid(), signal.SIGKILL)


# -- launching --------------------------------------------------------------------------------------
def torchrun_command(settings: LaunchSettings, run_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(settings.devices),
               "--max-restarts", "0", "--monitor-interval", "0.5"]
    rdzv = settings.rendezvous
    if rdzv is None:
        command.append("--standalone")
    else:
        timeout = int(settings.setup_timeout_s)
        command += ["--nnodes", str(rdzv.nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv.endpoint,
                    "--rdzv-id", rdzv.run_id,
                    "--rdzv-conf", f"is_host={str(rdzv.is_host).lower()},join_timeout={timeout},read_timeout=60"]
        if rdzv.local_addr:
            command += ["--local-addr", rdzv.local_addr]
    return command + ["-m", "sbora_core.training.rank", str(run_dir)]


def prepare_run_dir(run_dir: Path, job: TrainJob, settings: LaunchSettings, resume: bool) -> None:
    """A fresh run directory: what an earlier start left (events, results, a cancel) is gone."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("events.jsonl", "cancel", "result.json", "torchrun.log"):
        (run_dir / name).unlink(missing_ok=True)
    for folder in (run_dir / "ranks", run_dir / "acks"):
        folder.mkdir(exist_ok=True)
        for path in folder.iterdir():
            path.unlink()
    spec = {"job": job.to_dict(), "resume": resume, "threads": settings.threads_per_rank,
            "step_timeout_s": settings.step_timeout_s, "setup_timeout_s": settings.setup_timeout_s}
    (run_dir / "job.json").write_text(json.dumps(spec, default=str))


def _child_setup() -> None:
    die_with_parent()


def train_on_ranks(job: TrainJob, callbacks: Callbacks, run_dir: Path, settings: LaunchSettings, *,
                   resume: bool = True, abort: Callable[[], str | None] | None = None) -> TrainResult | None:
    """Run `job` on `settings.devices` ranks here (and those of the other nodes of `settings.rendezvous`);
    rank 0's result, None when rank 0 ran on another machine and this one's ranks ended cleanly.
    RankFailure when the ranks stopped without a result."""
    prepare_run_dir(run_dir, job, settings, resume)
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads_per_rank), "PYTHONUNBUFFERED": "1",
           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
           "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(max(60.0, 2 * settings.step_timeout_s))),
           **settings.env}
    with open(run_dir / "torchrun.log", "ab") as log:
        proc = subprocess.Popen(torchrun_command(settings, run_dir), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_child_setup)
    tail = EventTail(run_dir)
    cancel_at: float | None = None
    next_ask = 0.0
    try:
        while proc.poll() is None:
            news = tail.forward(callbacks)
            now = time.monotonic()
            if news or now >= next_ask:  # an event may be what a cancel waits for (a checkpoint)
                next_ask = now + CALLBACK_POLL_S
                reason = abort() if abort else None
                if reason:
                    raise RankFailure("aborted", reason)
                if cancel_at is None and callbacks.should_cancel():
                    (run_dir / "cancel").touch()
                    cancel_at = now
            if cancel_at is not None and now - cancel_at > settings.cancel_grace_s:
                stop(proc, run_dir)
                callbacks.on_log(f"the ranks did not stop within {settings.cancel_grace_s:.0f} s of the cancel; "
                                 "stopped them")
                return TrainResult("cancelled", None, {"steps": tail.last_step}, None)
            time.sleep(POLL_S)
        tail.forward(callbacks)
    finally:
        stop(proc, run_dir)
    result_file = run_dir / "result.json"
    if result_file.is_file():
        data = json.loads(result_file.read_text())
        return TrainResult(data["status"], Path(data["adapter_dir"]) if data["adapter_dir"] else None,
                           data["metrics"], Path(data["last_checkpoint"]) if data["last_checkpoint"] else None)
    failure = rank_failure(run_dir, settings.devices)
    if failure is None:
        return None
    raise failure


def stop(proc: subprocess.Popen, run_dir: Path, grace_s: float = 5.0) -> None:
    """torchrun and its ranks, gone: SIGTERM (torchrun stops its ranks), then SIGKILL whatever is left."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in rank_pids(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def rank_pids(run_dir: Path) -> list[int]:
    """The ranks of this run still running (a pid recorded by a rank, whose command names this run)."""
    alive = []
    for path in (run_dir / "ranks").glob("*.pid"):
        pid = int(path.read_text())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(run_dir).encode() in cmdline and b"sbora_core.training.rank" in cmdline:
            alive.append(pid)
    return alive


def rank_failure(run_dir: Path, local_ranks: int) -> RankFailure | None:
    """Why the ranks stopped, from what each wrote as it ended. The cause outranks its echoes: an
    error of a rank's own (out of memory first) over a rank that died without a word, over the
    connection errors its peers then saw. None when every rank here ended cleanly."""
    ends = [json.loads(p.read_text()) for p in sorted((run_dir / "ranks").glob("*.json"))]
    failed = [e for e in ends if not e["ok"]]
    for kind in ("out_of_memory", "error"):
        for end in failed:
            if end["kind"] == kind:
                return RankFailure(kind, end["message"], end["rank"], end["device"], end.get("error_type"))
    started = {int(p.stem) for p in (run_dir / "ranks").glob("*.pid")}
    stopped = {int(p.stem) for p in (run_dir / "ranks").glob("*.stopped") if p.stat().st_size}
    silent = sorted(started - stopped - {e["rank"] for e in ends})
    if silent or failed or len(ends) < local_ranks:
        who = f"rank {silent[0]}" if silent else "a rank on another machine" if failed else "a rank"
        return RankFailure("died", f"{who} died (killed, or its machine was lost); the job resumes from its last "
                                   "checkpoint", silent[0] if silent else None)
    return None
