"""Where a job's files live while it trains, and how its checkpoints outlive this machine.

With a local store the job writes straight into the store's directory, so a
worker on another machine that mounts the same volume resumes from it. With a
remote store (S3) the job trains in this machine's scratch directory, and each
checkpoint is copied to the store under `jobs/<id>/checkpoints/step-N/`, the
trainer state last: a checkpoint whose state file is in the store is complete,
and a worker taking the job over fetches the newest complete one before it
starts.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from app.core.config import Settings
from app.storage import ArtifactStore
from sbora_core.training.checkpoint import STATE_FILE

log = logging.getLogger("worker")


def _prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def job_dir(store: ArtifactStore, job_id: str, settings: Settings) -> Path:
    if store.local_root is not None:
        return store.local_root / _prefix(job_id)
    return settings.resolved_scratch_dir / _prefix(job_id)


def _stored_checkpoints(store: ArtifactStore, job_id: str) -> dict[str, list[str]]:
    """Complete checkpoints in the store: step directory name → its keys, oldest step first."""
    root = f"{_prefix(job_id)}/checkpoints/"
    by_step: dict[str, list[str]] = {}
    for key in store.keys(f"{_prefix(job_id)}/checkpoints"):
        by_step.setdefault(key[len(root):].split("/")[0], []).append(key)
    complete = {step: keys for step, keys in by_step.items()
                if step.startswith("step-") and any(k.endswith(f"/{STATE_FILE}") for k in keys)}
    return dict(sorted(complete.items(), key=lambda item: int(item[0].split("-")[1])))


def restore_checkpoint(store: ArtifactStore, job_id: str, workdir: Path, *, only: bool = False) -> str | None:
    """Fetch the job's newest complete checkpoint from a remote store into `workdir`; its name, if any.

    `only` drops every other checkpoint of `workdir`: the machines of a gang must all resume from
    the same one, and this machine may hold one the store never got (written, not yet copied)."""
    if store.local_root is not None:
        return None
    stored = _stored_checkpoints(store, job_id)
    if only:
        newest = list(stored)[-1] if stored else None
        for local in (workdir / "checkpoints").glob("step-*"):
            if local.name != newest:
                shutil.rmtree(local, ignore_errors=True)
    if not stored:
        return None
    step, keys = list(stored.items())[-1]
    target = workdir / "checkpoints" / step
    if (target / STATE_FILE).is_file():
        return step
    tmp = workdir / "checkpoints" / f".tmp-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for key in keys:  # read afresh (a step can be written again) and moved out of the store's local copies
        shutil.move(store.local_file(key, fresh=True), tmp / key.rsplit("/", 1)[1])
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("fetched checkpoint %s of %s from the store", step, job_id)
    return step


def publish_checkpoint(store: ArtifactStore, job_id: str, checkpoint: Path, keep: int) -> None:
    """Copy a checkpoint just written in scratch to a remote store (state file last), keeping `keep` there."""
    if store.local_root is not None:
        return
    prefix = f"{_prefix(job_id)}/checkpoints/{checkpoint.name}"
    store.delete(f"{prefix}/{STATE_FILE}")  # a step written again is incomplete until its state is back
    files = sorted((p for p in checkpoint.iterdir() if p.is_file()), key=lambda p: p.name == STATE_FILE)
    for path in files:
        store.put_file(f"{prefix}/{path.name}", path)
    for step in list(_stored_checkpoints(store, job_id))[:-max(1, keep)]:
        store.delete(f"{_prefix(job_id)}/checkpoints/{step}")


def discard(store: ArtifactStore, job_id: str, workdir: Path, *, stored_too: bool) -> None:
    """With `stored_too`, the job's checkpoints wherever they are; without, only a remote store's
    scratch copy here (a local store's directory is the store itself)."""
    if store.local_root is None:
        shutil.rmtree(workdir, ignore_errors=True)
        if stored_too:
            store.delete(_prefix(job_id))
    elif stored_too:
        shutil.rmtree(workdir, ignore_errors=True)
