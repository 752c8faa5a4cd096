"""API keys: random bearer tokens, stored only as sha256 hashes, each belonging to a tenant.

A key's scope is "tenant" (the tenant's own datasets, jobs, adapters) or "admin" (also what
all tenants share: registering and removing base models)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiKey, Tenant, utcnow

KEY_PREFIX = "sbora-"
SCOPES = ("tenant", "admin")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_api_key(session: Session, tenant_name: str, name: str = "", scope: str = "tenant") -> tuple[ApiKey, str]:
    """A new key for `tenant_name` (created if needed); the plain key is returned once, never stored."""
    if scope not in SCOPES:
        raise ValueError(f"scope: use one of {', '.join(SCOPES)}, not {scope!r}")
    tenant = get_or_create_tenant(session, tenant_name)
    plain = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant.id, name=name, prefix=plain[: len(KEY_PREFIX) + 6], key_hash=hash_key(plain),
                 scope=scope)
    session.add(key)
    session.flush()
    return key, plain


def revoke_api_key(session: Session, key_id: str) -> bool:
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = utcnow()
    return True


def tenant_for_key(session: Session, plain: str, scope: str = "tenant") -> Tenant | None:
    """The tenant of an active key that holds `scope`, in one indexed query (it runs on every request)."""
    query = (select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
             .where(ApiKey.key_hash == hash_key(plain), ApiKey.revoked_at.is_(None)))
    if scope == "admin":
        query = query.where(ApiKey.scope == "admin")
    return session.scalar(query)
