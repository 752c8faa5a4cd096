"""Dependencies shared by the routes, as `Annotated` aliases.

FastAPI runs every plain-function dependency in its thread pool, one hand-off
between the event loop and a thread each (two for a generator). Those that do
no I/O are async functions here, so a request crosses to a thread for its key
lookup, its route and, while its session holds a connection, closing it:
under load the hand-offs were a large share of the API's CPU.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import get_sessionmaker
from app.core.security import tenant_for_key
from app.models import Tenant
from app.storage import ArtifactStore, get_store


async def get_session() -> AsyncIterator[Session]:
    """The request's session: made without I/O (it connects on its first query, in a thread); closed
    in a thread only while it still holds a connection (returning one rolls back over the network)."""
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def settings() -> Settings:
    return get_settings()


async def store() -> ArtifactStore:
    return get_store()  # made at start (the lifespan checks it), a cached object after


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(settings)]
StoreDep = Annotated[ArtifactStore, Depends(store)]


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
