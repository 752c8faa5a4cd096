"""The adapter registry: adapters a job trained, their download archives, their update maps."""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import Conflict, Invalid, NotFound
from app.ids import new_id
from app.models import UNFINISHED_STATUSES, Adapter, Evaluation, Job, Tenant
from app.services import groups
from app.services.queries import delete_owned, owned, page
from app.services.quotas import check_storage
from app.storage import ArtifactStore, discard_quietly, sha256_file_cached
from sbora_core.method.adapter_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    export_peft,
    load_adapter,
    save_adapter,
)
from sbora_core.method.files import sha256_file
from sbora_core.method.merge import compose_adapters
from sbora_core.method.update_map import UpdateMap, update_map

ArchiveFormat = Literal["sparse", "peft"]
_ARCHIVES: dict[str, str] = {"sparse": "sparse.zip", "peft": "peft.zip"}


def list_adapters(session: Session, tenant: Tenant, base_model: str | None, limit: int,
                  offset: int, checkpoints: bool = False) -> tuple[list[Adapter], int]:
    """The tenant's adapters, newest first; a job's checkpoints only with `checkpoints`."""
    query = select(Adapter).where(Adapter.tenant_id == tenant.id)
    if not checkpoints:
        query = query.where(Adapter.checkpoint_step.is_(None))
    if base_model:
        query = query.where(Adapter.base_model == base_model)
    return page(session, query.order_by(Adapter.created_at.desc()), limit, offset)


def get_adapter(session: Session, tenant: Tenant, adapter_id: str) -> Adapter:
    return owned(session, Adapter, tenant, adapter_id, "adapter")


def get_named_adapter(session: Session, tenant: Tenant, adapter_id: str, field: str) -> Adapter:
    """`get_adapter`, whose NotFound names the request's field (`adapter_id`, `adapter_ids[3]`)."""
    try:
        return get_adapter(session, tenant, adapter_id)
    except NotFound as exc:
        raise NotFound(f"{field}: {exc}", param=field) from exc


def delete_adapter(session: Session, tenant: Tenant, adapter_id: str, store: ArtifactStore) -> None:
    """Delete an adapter; Conflict while an unfinished job starts from it or an unfinished evaluation
    scores it (either would fail later, having waited in the queue for nothing)."""
    adapter = get_adapter(session, tenant, adapter_id)
    users = unfinished_users(session, adapter)
    if users:
        raise Conflict(f"adapter {adapter_id} is used by {len(users)} unfinished job(s) ({', '.join(users)}); "
                       "cancel them or wait for them to finish first")
    key = adapter.storage_key
    groups.release_adapter(session, adapter.id)  # its group slot is free again
    delete_owned(session, Adapter, adapter, "adapter")
    session.commit()
    discard_quietly(store, key)


def unfinished_users(session: Session, adapter: Adapter) -> list[str]:
    """The ids of unfinished jobs that start from `adapter` and unfinished evaluations that score it."""
    starts = session.scalars(select(Job.id).where(Job.init_adapter_id == adapter.id,
                                                  Job.status.in_(UNFINISHED_STATUSES)).order_by(Job.id)).all()
    # Candidates are stored as JSON; the tenant's unfinished evaluations are few (a quota bounds them).
    evaluations = session.scalars(select(Evaluation).join(Job, Job.id == Evaluation.id).where(
        Evaluation.tenant_id == adapter.tenant_id, Job.status.in_(UNFINISHED_STATUSES)).order_by(Evaluation.id)).all()
    scores = [e.id for e in evaluations if any(adapter.id in c.get("adapter_ids", []) for c in e.candidates)]
    return [*starts, *scores]


def archive(adapter: Adapter, fmt: ArchiveFormat, store: ArtifactStore) -> tuple[Path, str]:
    """The download archive of `adapter` in `fmt` and its sha256 (the download's ETag)."""
    if fmt == "sparse":
        return store.local_file(archive_key(adapter, fmt), adapter.sha256), adapter.sha256
    path = store.local_file(archive_key(adapter, fmt))
    return path, sha256_file_cached(path)


def archive_key(adapter: Adapter, fmt: ArchiveFormat) -> str:
    return f"{adapter.storage_key}/{_ARCHIVES[fmt]}"


def adapter_files(adapter: Adapter, store: ArtifactStore) -> Path:
    """A directory on this machine holding the adapter's own files (what `load_adapter` reads)."""
    return store.local_dir(adapter.storage_key, (CONFIG_FILE, WEIGHTS_FILE))


def adapter_update_map(adapter: Adapter, store: ArtifactStore) -> UpdateMap:
    return update_map(load_adapter(adapter_files(adapter, store)))


def _zip_dir(source: Path, target: Path) -> None:
    """The adapter's two files (a checkpoint's folder also holds the trainer's state: left out)."""
    # Fixed timestamps and order: the same adapter always gives the same archive bytes (stable ETag).
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(source.iterdir()):
            if path.name in (CONFIG_FILE, WEIGHTS_FILE):
                info = zipfile.ZipInfo(path.name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zipped.writestr(info, path.read_bytes())


def register_adapter(session: Session, job: Job, adapter_dir: Path, store: ArtifactStore,
                     checkpoint_step: int | None = None, metrics: dict | None = None) -> Adapter:
    """Copy a trained adapter (or a job's checkpoint) into the registry with its two download
    archives (sparse, PEFT)."""
    return _register(session, adapter_dir, store, tenant_id=job.tenant_id, base_model=job.base_model,
                     job_id=job.id, name=job.name, checkpoint_step=checkpoint_step, metrics=metrics)


def _register(session: Session, adapter_dir: Path, store: ArtifactStore, *, tenant_id: str, base_model: str,
              job_id: str | None, name: str | None, checkpoint_step: int | None = None,
              metrics: dict | None = None) -> Adapter:
    adapter = load_adapter(adapter_dir)
    adapter_id = new_id("ad")
    prefix = f"adapters/{adapter_id}"
    for file in (WEIGHTS_FILE, CONFIG_FILE):
        store.put_file(f"{prefix}/{file}", adapter_dir / file)
    with tempfile.TemporaryDirectory() as tmp:
        sparse_zip = Path(tmp) / "sparse.zip"
        _zip_dir(adapter_dir, sparse_zip)
        sparse = store.put_file(f"{prefix}/{_ARCHIVES['sparse']}", sparse_zip)
        peft_dir = export_peft(adapter, Path(tmp) / "peft", base_model)
        _zip_dir(peft_dir, Path(tmp) / "peft.zip")
        store.put_file(f"{prefix}/{_ARCHIVES['peft']}", Path(tmp) / "peft.zip")
    config = adapter.config
    row = Adapter(
        id=adapter_id, tenant_id=tenant_id, job_id=job_id, name=name, base_model=base_model,
        base_fingerprint=config.base_fingerprint or "", variant=config.variant, r=config.r, alpha=config.alpha,
        target_modules=sorted({n.split(".")[-1] for n in adapter.modules}),
        trainable_params=adapter.trainable_params(), size_bytes=sparse.size, sha256=sparse.sha256,
        weights_sha256=sha256_file(adapter_dir / WEIGHTS_FILE), storage_key=prefix,
        metrics=metrics if metrics is not None else dict(adapter.metadata.get("metrics", {})),
        checkpoint_step=checkpoint_step,
    )
    session.add(row)
    return row


def compose(session: Session, tenant: Tenant, adapter_ids: list[str], weights: list[float] | None,
            name: str | None, settings: Settings, store: ArtifactStore) -> Adapter:
    """Register the exact sum of the tenant's adapters (weighted) as a new adapter of its own."""
    if len(set(adapter_ids)) != len(adapter_ids):
        raise Invalid("adapter_ids", "adapter_ids: an adapter is listed twice")
    if weights is not None and len(weights) != len(adapter_ids):
        raise Invalid("weights", f"weights: {len(weights)} weight(s) for {len(adapter_ids)} adapter(s)")
    parts = [get_named_adapter(session, tenant, a, f"adapter_ids[{i}]") for i, a in enumerate(adapter_ids)]
    if len({p.base_model for p in parts}) > 1:
        raise Invalid("adapter_ids", f"adapter_ids: the adapters belong to different base models: "
                                     f"{sorted({p.base_model for p in parts})}")
    loaded = []
    for part in parts:
        adapter = load_adapter(adapter_files(part, store))
        adapter.name = part.id
        loaded.append(adapter)
    try:
        composed = compose_adapters(loaded, weights)
    except ValueError as exc:  # overlapping index sets, LoRA, variants that cross
        raise Invalid("adapter_ids", f"adapter_ids: {exc}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_adapter(composed, Path(tmp) / "composed")
        check_storage(session, tenant, sum(f.stat().st_size for f in directory.iterdir()), settings)
        row = _register(session, directory, store, tenant_id=tenant.id, base_model=parts[0].base_model, job_id=None,
                        name=name, metrics={"composed_of": composed.metadata["composed_of"]})
    session.commit()
    return row


def register_checkpoint(session: Session, job: Job, step: int, checkpoint_dir: Path, store: ArtifactStore,
                        keep: int, metrics: dict) -> list[str]:
    """A job's checkpoint as a servable adapter (`ft:...:ckpt-step-N`); the job keeps its `keep` newest.

    A resumed job may write a step again: that step's earlier registration is replaced. Returns
    the storage keys of the registrations dropped, to delete once the session has committed.
    """
    older = list(session.scalars(select(Adapter).where(Adapter.job_id == job.id, Adapter.checkpoint_step.is_not(None))
                                 .order_by(Adapter.checkpoint_step.desc())))
    register_adapter(session, job, checkpoint_dir, store, checkpoint_step=step, metrics=metrics)
    kept = [a for a in older if a.checkpoint_step != step][: max(0, keep - 1)]
    dropped = [a for a in older if a not in kept]
    for stale in dropped:
        session.delete(stale)
    return [stale.storage_key for stale in dropped]


def checkpoints_of(session: Session, job: Job) -> list[Adapter]:
    """The job's registered checkpoints, newest first."""
    return list(session.scalars(select(Adapter).where(Adapter.job_id == job.id, Adapter.checkpoint_step.is_not(None))
                                .order_by(Adapter.checkpoint_step.desc())))
