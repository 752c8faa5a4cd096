"""Datasets: uploaded, validated with line-numbered problems, stored, listed and deleted."""

from __future__ import annotations

from typing import Any, BinaryIO

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import catalog
from app.core.config import Settings
from app.errors import Conflict, Invalid, NotFound, TooLarge
from app.ids import new_id
from app.models import TERMINAL_STATUSES, Dataset, Job, Tenant
from app.services.queries import delete_owned, owned, page
from app.services.quotas import check_storage
from app.storage import ArtifactStore, UploadTooLarge, discard_quietly
from sbora_core.training.data import validate_dataset
from sbora_core.training.eval_items import validate_eval_dataset
from sbora_core.training.job import Hyperparameters

# Steps per epoch are estimated at the default batch size; a job's own size rescales them.
DEFAULT_BATCH_SIZE = Hyperparameters().batch_size


def create_dataset(session: Session, tenant: Tenant, stream: BinaryIO, filename: str,
                   settings: Settings, store: ArtifactStore) -> Dataset:
    """Stream the upload into the store, validate it, and record it; nothing is kept on failure."""
    dataset_id = new_id("ds")
    key = f"datasets/{dataset_id}.data"
    try:
        stored = store.put_stream(key, stream, limit=settings.max_upload_bytes)
    except UploadTooLarge as exc:
        raise TooLarge(f"file: {exc}; split the dataset or raise SBORA_MAX_UPLOAD_BYTES") from exc
    try:
        check_storage(session, tenant, stored.size, settings)
        model_id = next(iter(catalog.offered()))
        # An evaluation set (choices, or prompts with answers) is checked as one; anything else as training data.
        report = validate_eval_dataset(store.local_file(key), min_records=settings.min_dataset_records) or \
            validate_dataset(store.local_file(key), catalog.tokenizer(model_id),
                             min_records=settings.min_dataset_records, batch_size=DEFAULT_BATCH_SIZE)
        if not report.ok:
            errors: list[dict[str, Any]] = [{"line": p.line, "message": p.message} for p in report.errors]
            more = f" (and {report.more_problems} more)" if report.more_problems else ""
            raise Invalid("file", f"the dataset has {len(errors)} problem(s){more}; fix them and upload again",
                          errors)
    except BaseException:
        discard_quietly(store, key)
        raise
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


def list_datasets(session: Session, tenant: Tenant, limit: int, offset: int) -> tuple[list[Dataset], int]:
    query = select(Dataset).where(Dataset.tenant_id == tenant.id).order_by(Dataset.created_at.desc())
    return page(session, query, limit, offset)


def get_dataset(session: Session, tenant: Tenant, dataset_id: str) -> Dataset:
    return owned(session, Dataset, tenant, dataset_id, "dataset")


def job_datasets(session: Session, tenant: Tenant, training_id: str,
                 validation_id: str | None) -> list[tuple[str, Dataset]]:
    """A job's datasets, each with the request field that names it, loaded once for every check;
    Invalid naming the field when the tenant does not have one."""
    found = []
    for field, dataset_id in (("training_dataset_id", training_id), ("validation_dataset_id", validation_id)):
        if dataset_id is None:
            continue
        try:
            found.append((field, get_dataset(session, tenant, dataset_id)))
        except NotFound as exc:
            raise Invalid(field, f"{field}: {exc}; upload it with POST /datasets first") from exc
    return found


def delete_dataset(session: Session, tenant: Tenant, dataset_id: str, store: ArtifactStore) -> None:
    dataset = get_dataset(session, tenant, dataset_id)
    in_use = session.scalar(select(func.count()).select_from(Job).where(
        (Job.train_dataset_id == dataset.id) | (Job.val_dataset_id == dataset.id),
        Job.status.not_in(TERMINAL_STATUSES)))
    if in_use:
        raise Conflict(f"dataset {dataset_id} is used by {in_use} unfinished job(s); cancel them first")
    key = dataset.storage_key
    delete_owned(session, Dataset, dataset, "dataset")
    session.commit()
    discard_quietly(store, key)
