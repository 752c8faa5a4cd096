"""Database engine and sessions (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
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
    return create_engine(url, **(pool or {"pool_pre_ping": True, "pool_size": POOL_SIZE, "max_overflow": 20}))


POOL_SIZE = 10


def fill_pool(engine: Engine, size: int = POOL_SIZE) -> None:
    """Open the pool's connections now, all at once. A PostgreSQL connection costs a backend
    process and a handshake: opened lazily, the first burst of requests after a start paid for
    them one by one and waited 0.5-1 s (bench/load.py's first second). SQLite needs nothing."""
    if engine.dialect.name == "sqlite":
        return
    connections = []
    try:
        for _ in range(size):
            connection = engine.connect()
            connections.append(connection)
            connection.execute(text("SELECT 1"))
    finally:
        for connection in connections:
            connection.close()


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
