"""Per-tenant limits: bytes stored (datasets plus adapters) and unfinished jobs."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.errors import QuotaExceeded, TooLarge
from app.models import UNFINISHED_STATUSES, Adapter, Dataset, Job, Tenant


def stored_bytes(session: Session, tenant: Tenant) -> int:
    datasets = session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.tenant_id == tenant.id))
    adapters = session.scalar(select(func.coalesce(func.sum(Adapter.size_bytes), 0)).where(Adapter.tenant_id == tenant.id))
    return int(datasets or 0) + int(adapters or 0)


def check_storage(session: Session, tenant: Tenant, more_bytes: int, settings: Settings) -> None:
    """TooLarge when storing `more_bytes` would take the tenant over its quota."""
    used = stored_bytes(session, tenant)
    if used + more_bytes > settings.max_stored_bytes:
        raise TooLarge(f"file: storing {more_bytes} more bytes would take tenant storage to {used + more_bytes}, "
                       f"over its {settings.max_stored_bytes} byte quota; delete datasets or adapters first")


def check_unfinished_jobs(session: Session, tenant: Tenant, settings: Settings) -> None:
    """QuotaExceeded when the tenant already has as many queued and running jobs as allowed."""
    unfinished = session.scalar(select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant.id, Job.status.in_(UNFINISHED_STATUSES))) or 0
    if unfinished >= settings.max_concurrent_jobs:
        raise QuotaExceeded(f"{unfinished} jobs are queued or running, the limit per tenant is "
                            f"{settings.max_concurrent_jobs}; wait for one to finish or cancel one")
