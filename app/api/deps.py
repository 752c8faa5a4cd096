"""Dependencies shared by the routes, as `Annotated` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, HTTPException, status
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import get_sessionmaker
from app.core.security import tenant_for_key
from app.models import Tenant
from app.storage import ArtifactStore, get_store


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]


def get_current_tenant(
    session: SessionDep, authorization: Annotated[str | None, Header()] = None
) -> Tenant:
    scheme, _, token = (authorization or "").partition(" ")
    tenant = tenant_for_key(session, token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    if tenant is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>' (create one with `sbora keys create`)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]


def get_admin_tenant(tenant: CurrentTenant, session: SessionDep,
                     authorization: Annotated[str | None, Header()] = None) -> Tenant:
    """The caller, when its key has the admin scope (what every tenant shares: the base models)."""
    token = (authorization or "").partition(" ")[2].strip()
    if tenant_for_key(session, token, scope="admin") is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail="this needs an admin key; an operator creates one with `sbora keys create --tenant NAME --admin`",
        )
    return tenant


AdminTenant = Annotated[Tenant, Depends(get_admin_tenant)]
