"""Service operations on datasets, jobs, events and adapters, always scoped to a tenant.

Routes call these and return `*Public` schemas. Problems are raised as
`NotFound` / `Invalid` / `Conflict`; `app.main` turns them into 404 / 422 / 409.
Another tenant's object is indistinguishable from a missing one.
"""

from __future__ import annotations

import logging
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import catalog
from app.api.deps import well_formed_id
from app.core.config import Settings
from app.models import TERMINAL_STATUSES, Adapter, Dataset, Job, JobEvent, Tenant, new_id, utcnow
from app.schemas import HyperparametersSpec
from app.storage import LocalArtifactStore, UploadTooLarge, sha256_file

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = HyperparametersSpec.model_fields["batch_size"].default


class NotFound(LookupError):
    pass


class Invalid(ValueError):
    """Bad input: `field` names what to change, `errors` may carry line-numbered problems."""

    def __init__(self, field: str, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.field, self.message, self.errors = field, message, errors


class Conflict(RuntimeError):
    pass


class TooLarge(ValueError):
    pass


class QuotaExceeded(RuntimeError):
    """A per-tenant limit; answered with 429."""


def stored_bytes(session: Session, tenant: Tenant) -> int:
    datasets = session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant.id))
    adapters = session.scalar(select(func.coalesce(func.sum(Adapter.size_bytes), 0)).where(Adapter.tenant_id == tenant.id))
    return int(datasets or 0) + int(adapters or 0)


def _owned(session: Session, model: type, tenant: Tenant, object_id: str, what: str):
    row = session.get(model, object_id) if well_formed_id(object_id) else None
    if row is None or row.tenant_id != tenant.id:
        raise NotFound(f"no {what} with id {object_id!r}")
    return row


def _page(session: Session, query, limit: int, offset: int):
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = list(session.scalars(query.limit(limit).offset(offset)))
    return rows, total


# -- datasets ----------------------------------------------------------------------------------
def create_dataset(session: Session, tenant: Tenant, stream: BinaryIO, filename: str,
                   settings: Settings, store: LocalArtifactStore) -> Dataset:
    """Stream the upload into the store, validate it, and record it; nothing is kept on failure."""
    from sbora_core.data import validate_dataset

    dataset_id = new_id("ds")
    key = f"datasets/{dataset_id}.data"
    try:
        stored = store.put_stream(key, stream, limit=settings.max_upload_bytes)
    except UploadTooLarge as exc:
        raise TooLarge(f"file: {exc}; split the dataset or raise SBORA_MAX_UPLOAD_BYTES") from exc
    used = stored_bytes(session, tenant)
    if used + stored.size > settings.max_stored_bytes:
        store.delete(key)
        raise TooLarge(f"file: storing {stored.size} more bytes would take tenant storage to {used + stored.size}, "
                       f"over its {settings.max_stored_bytes} byte quota; delete datasets or adapters first")
    model_id = next(iter(catalog.offered()))
    try:
        # Steps per epoch are estimated at the default batch size; a job's own size rescales them.
        report = validate_dataset(store.local_path(key), catalog.tokenizer(model_id),
                                  min_records=settings.min_dataset_records, batch_size=DEFAULT_BATCH_SIZE)
    except Exception:
        store.delete(key)
        raise
    if not report.ok:
        store.delete(key)
        errors = [{"line": p.line, "message": p.message} for p in report.errors]
        more = f" (and {report.more_problems} more)" if report.more_problems else ""
        raise Invalid("file", f"the dataset has {len(errors)} problem(s){more}; fix them and upload again",
                      errors)
    stats = report.to_dict()
    stats["warnings"] = [{"line": p.line, "message": p.message} for p in report.warnings]
    stats["tokenizer"] = model_id
    stats["steps_per_epoch_batch_size"] = DEFAULT_BATCH_SIZE
    for drop in ("errors", "ok", "format", "records"):
        stats.pop(drop, None)
    dataset = Dataset(id=dataset_id, tenant_id=tenant.id, filename=(filename or "dataset")[:255],
                      format=report.format or "unknown", records=report.records, stats=stats,
                      size_bytes=stored.size, sha256=stored.sha256, storage_key=key)
    session.add(dataset)
    session.commit()
    return dataset


def list_datasets(session: Session, tenant: Tenant, limit: int, offset: int):
    query = select(Dataset).where(Dataset.tenant_id == tenant.id).order_by(Dataset.created_at.desc())
    return _page(session, query, limit, offset)


def get_dataset(session: Session, tenant: Tenant, dataset_id: str) -> Dataset:
    return _owned(session, Dataset, tenant, dataset_id, "dataset")


def delete_dataset(session: Session, tenant: Tenant, dataset_id: str, store: LocalArtifactStore) -> None:
    dataset = get_dataset(session, tenant, dataset_id)
    in_use = session.scalar(select(func.count()).select_from(Job).where(
        (Job.train_dataset_id == dataset.id) | (Job.val_dataset_id == dataset.id),
        Job.status.not_in(TERMINAL_STATUSES)))
    if in_use:
        raise Conflict(f"dataset {dataset_id} is used by {in_use} unfinished job(s); cancel them first")
    key = dataset.storage_key
    session.delete(dataset)
    session.commit()
    store.delete(key)


# -- jobs --------------------------------------------------------------------------------------
def _check_dataset_ref(session: Session, tenant: Tenant, dataset_id: str | None, field: str) -> None:
    if dataset_id is None:
        return
    try:
        get_dataset(session, tenant, dataset_id)
    except NotFound as exc:
        raise Invalid(field, f"{field}: {exc}; upload it with POST /datasets first") from exc


def create_job(session: Session, tenant: Tenant, spec: Any, settings: Settings) -> Job:
    """Validate everything a worker would trip over, then record the job as queued."""
    from sbora_core.train import Hyperparameters

    unfinished = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant.id, Job.status.in_(("queued", "running")))) or 0
    if unfinished >= settings.max_concurrent_jobs:
        raise QuotaExceeded(f"{unfinished} jobs are queued or running, the limit per tenant is "
                            f"{settings.max_concurrent_jobs}; wait for one to finish or cancel one")

    try:
        catalog.source_of(spec.base_model)
    except catalog.UnknownBaseModel as exc:
        raise Invalid("base_model", str(exc)) from exc
    _check_dataset_ref(session, tenant, spec.training_dataset_id, "training_dataset_id")
    _check_dataset_ref(session, tenant, spec.validation_dataset_id, "validation_dataset_id")
    method = spec.method.model_dump()
    try:
        catalog.check_method(spec.base_model, method)
    except ValueError as exc:
        field = str(exc).split(":", 1)[0]
        raise Invalid(f"method.{field}", f"method.{exc}") from exc
    hyperparameters = spec.hyperparameters.model_dump()
    try:
        Hyperparameters(**hyperparameters)
    except ValueError as exc:
        raise Invalid(f"hyperparameters.{str(exc).split(':', 1)[0]}", f"hyperparameters.{exc}") from exc
    job = Job(tenant_id=tenant.id, name=spec.name, base_model=spec.base_model, quantization=spec.quantization,
              method=method, hyperparameters=hyperparameters, train_dataset_id=spec.training_dataset_id,
              val_dataset_id=spec.validation_dataset_id, status="queued")
    session.add(job)
    session.flush()
    add_event(session, job.id, "status", "queued", {"status": "queued"})
    session.commit()
    return job


def list_jobs(session: Session, tenant: Tenant, status: str | None, limit: int, offset: int):
    query = select(Job).where(Job.tenant_id == tenant.id)
    if status:
        query = query.where(Job.status == status)
    return _page(session, query.order_by(Job.created_at.desc()), limit, offset)


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    return _owned(session, Job, tenant, job_id, "job")


def cancel_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    """Queued jobs end at once; running ones stop within one optimiser step."""
    job = get_job(session, tenant, job_id)
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id} already {job.status}")
    job.cancel_requested = True
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", utcnow()
        add_event(session, job.id, "status", "cancelled before it started", {"status": "cancelled"})
    else:
        add_event(session, job.id, "log", "cancellation requested")
    session.commit()
    return job


def add_event(session: Session, job_id: str, kind: str, message: str = "", data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message, data=data or {}))


def list_events(session: Session, tenant: Tenant, job_id: str, after: int, limit: int, kind: str | None = None):
    get_job(session, tenant, job_id)
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
    if kind:
        query = query.where(JobEvent.kind == kind)
    return _page(session, query.order_by(JobEvent.id), limit, 0)


# -- adapters ----------------------------------------------------------------------------------
def list_adapters(session: Session, tenant: Tenant, base_model: str | None, limit: int, offset: int):
    query = select(Adapter).where(Adapter.tenant_id == tenant.id)
    if base_model:
        query = query.where(Adapter.base_model == base_model)
    return _page(session, query.order_by(Adapter.created_at.desc()), limit, offset)


def get_adapter(session: Session, tenant: Tenant, adapter_id: str) -> Adapter:
    return _owned(session, Adapter, tenant, adapter_id, "adapter")


def delete_adapter(session: Session, tenant: Tenant, adapter_id: str, store: LocalArtifactStore) -> None:
    adapter = get_adapter(session, tenant, adapter_id)
    key = adapter.storage_key
    session.delete(adapter)
    session.commit()
    store.delete(key)


def _zip_dir(source: Path, target: Path) -> None:
    # Fixed timestamps and order: the same adapter always gives the same archive bytes (stable ETag).
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(source.iterdir()):
            if path.is_file():
                info = zipfile.ZipInfo(path.name, date_time=(2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, path.read_bytes())


def register_adapter(session: Session, job: Job, adapter_dir: Path, store: LocalArtifactStore) -> Adapter:
    """Copy a trained adapter into the registry with its two download archives (sparse, PEFT)."""
    from sbora_core.adapter_io import CONFIG_FILE, WEIGHTS_FILE, export_peft, load_adapter

    adapter = load_adapter(adapter_dir)
    adapter_id = new_id("ad")
    prefix = f"adapters/{adapter_id}"
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        store.put_file(f"{prefix}/{name}", adapter_dir / name)
    with tempfile.TemporaryDirectory() as tmp:
        sparse_zip = Path(tmp) / "sparse.zip"
        _zip_dir(adapter_dir, sparse_zip)
        sparse = store.put_file(f"{prefix}/sparse.zip", sparse_zip)
        peft_dir = export_peft(adapter, Path(tmp) / "peft", job.base_model)
        _zip_dir(peft_dir, Path(tmp) / "peft.zip")
        store.put_file(f"{prefix}/peft.zip", Path(tmp) / "peft.zip")
    config = adapter.config
    row = Adapter(
        id=adapter_id, tenant_id=job.tenant_id, job_id=job.id, name=job.name, base_model=job.base_model,
        base_fingerprint=config.base_model or "", variant=config.variant, r=config.r, alpha=config.alpha,
        target_modules=sorted({n.split(".")[-1] for n in adapter.modules}),
        trainable_params=adapter.trainable_params(), size_bytes=sparse.size, sha256=sparse.sha256,
        weights_sha256=sha256_file(adapter_dir / WEIGHTS_FILE), storage_key=prefix,
        metrics=dict(adapter.metadata.get("metrics", {})),
    )
    session.add(row)
    return row
