"""Jobs on several devices: the worker starts the job's ranks with torch.distributed's elastic launcher
(`sbora_core.training.launch`) and turns how they ended into the job's outcome.

A job with `resources.devices` x `resources.nodes` of 1 trains in the worker's own process, as it
always has. Otherwise this machine runs `devices` ranks (their torch threads shared out between
them), in a run directory of the scratch space; rank 0's events reach the job's callbacks as they
would from one process.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable

import torch

from app.core.config import Settings
from sbora_core.training.job import Resources, TrainJob
from sbora_core.training.launch import LaunchSettings, RankFailure, Rendezvous, train_on_ranks
from sbora_core.training.train import Callbacks, TrainResult, train

# What a rank's own error means for the job (see worker.runner.classify_error for one process).
_ERROR_CODES = {"FloatingPointError": "training_diverged", "DatasetError": "invalid_dataset",
                "UnknownModelError": "unknown_model", "ConfigError": "invalid_configuration",
                "AdapterFormatError": "invalid_configuration", "ValueError": "invalid_configuration"}


def visible_gpus() -> int:
    """The GPUs this process sees, counted without initialising CUDA (torch asks NVML). The worker's
    main process asks, then forks a pool process for every job; `torch.cuda.is_available()` would
    initialise the CUDA driver there, and no process forked after that can use CUDA."""
    return torch.cuda.device_count()


def worker_kind() -> str:
    return "gpu" if visible_gpus() else "cpu"


def offered_devices(settings: Settings) -> int:
    """Devices this worker offers one job: the setting, else every GPU it sees, else 1 (CPU)."""
    if settings.worker_devices:
        return settings.worker_devices
    return visible_gpus() or 1


def worker_address(settings: Settings) -> str:
    return settings.worker_address or socket.gethostname()


def job_resources(resources: dict | None) -> Resources:
    """A job row's resources (rows older than them have none: the defaults)."""
    return Resources(**(resources or {}))


def launch_settings(resources: Resources, settings: Settings, rendezvous: Rendezvous | None = None) -> LaunchSettings:
    return LaunchSettings(devices=resources.devices, rendezvous=rendezvous,
                          step_timeout_s=settings.distributed_step_timeout_s,
                          setup_timeout_s=settings.distributed_setup_timeout_s,
                          threads_per_rank=max(1, settings.resolved_torch_threads // resources.devices))


def run_training(spec: TrainJob, callbacks: Callbacks, settings: Settings, job_id: str, *,
                 rendezvous: Rendezvous | None = None,
                 abort: Callable[[], str | None] | None = None) -> TrainResult | None:
    """Train `spec` here: in this process on one device, else on this machine's ranks of the job.
    None when rank 0 ran on another machine and this machine's ranks ended cleanly."""
    if spec.resources.world_size == 1:
        return train(spec, callbacks, resume=True)
    run_dir = settings.resolved_scratch_dir / "ranks" / job_id
    try:
        return train_on_ranks(spec, callbacks, run_dir, launch_settings(spec.resources, settings, rendezvous),
                              abort=abort)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def failure_outcome(failure: RankFailure) -> tuple[str, str]:
    """The job's error code and message for ranks that stopped with an error of their own."""
    if failure.kind == "out_of_memory":
        return "out_of_memory", str(failure)
    message = str(failure)
    if "os error 28)" in message or "No space left" in message:
        return "disk_full", f"{message}; free space and retry"
    return _ERROR_CODES.get(failure.error_type or "", "internal_error"), message
