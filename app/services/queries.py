"""Query helpers every service uses: tenant-owned lookups and pages."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.ids import well_formed_id
from app.models import Tenant

Row = TypeVar("Row")


def owned(session: Session, model: type[Row], tenant: Tenant, object_id: str, what: str) -> Row:
    """The tenant's object with this id; NotFound for a missing one and for another tenant's alike."""
    row = session.get(model, object_id) if well_formed_id(object_id) else None
    if row is None or getattr(row, "tenant_id", None) != tenant.id:
        raise NotFound(f"no {what} with id {object_id!r}")
    return row


def page(session: Session, query: Select[Any], limit: int, offset: int) -> tuple[list[Any], int]:
    """One page of `query`'s rows and the total count."""
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = list(session.scalars(query.limit(limit).offset(offset)))
    return rows, total


def delete_owned(session: Session, model: Any, row: Any, what: str) -> None:
    """Delete `row` with a statement that says whether it deleted it: of concurrent deletes of one
    object exactly one succeeds, the others answer NotFound (an ORM delete of a row another request
    had just deleted passed silently, and both answered 204). Commits are the caller's."""
    row_id, tenant_id = row.id, row.tenant_id  # read before the rollback below expires the row
    deleted = session.execute(delete(model).where(model.id == row_id, model.tenant_id == tenant_id)
                              .execution_options(synchronize_session=False))
    if getattr(deleted, "rowcount", 1) != 1:
        session.rollback()
        raise NotFound(f"no {what} with id {row_id!r}")
    session.expunge(row)
