"""Database engine and sessions (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from app.core.config import get_settings


def make_engine(url: str, **pool: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            # WAL lets the API read while a worker writes; the API and workers are separate processes.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # In WAL mode NORMAL never corrupts the database; a power cut may lose the last commits,
            # but a crashed process loses nothing, and each commit skips an fsync.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, **(pool or {"pool_pre_ping": True, "pool_size": 10, "max_overflow": 20}))


@lru_cache
def get_engine() -> Engine:
    settings = get_settings()
    if settings.resolved_database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return make_engine(settings.resolved_database_url)


@lru_cache
def get_side_engine() -> Engine:
    """Connections outside the request pool, opened per use, for the few reads made while a request
    already holds a pooled connection: drawing a second one from the pool deadlocks it once every
    pooled connection is held by a request waiting for its second."""
    return make_engine(get_settings().resolved_database_url, poolclass=NullPool)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error (workers, CLI)."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


T = TypeVar("T")


async def look_up_then_release(session: Session, look_up: Callable[..., T], *args: Any) -> T:
    """`look_up(session, *args)` in a worker thread, then the session's connection back to the pool:
    for async routes that go on for seconds (generation, event streams). Holding a pooled connection
    (or the event loop) meanwhile let 20 generating clients exhaust the pool and stall every other
    route for its 30 s timeout."""
    def run() -> T:
        try:
            return look_up(session, *args)
        finally:
            session.close()  # loaded attributes stay readable on the detached rows

    return await asyncio.to_thread(run)
