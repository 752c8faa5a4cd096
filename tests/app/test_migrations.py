"""The migrations build exactly the tables the models describe: a column added to one but not the
other fails here, not in production."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from stack import clear_caches


def test_migrations_match_the_models(tmp_path, monkeypatch):
    monkeypatch.setenv("SBORA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SBORA_DATABASE_URL", "")
    clear_caches()
    try:
        from app.core.db import get_engine
        from app.migrate import upgrade_database
        from app.models import Base

        upgrade_database()
        with get_engine().connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        monkeypatch.undo()
        clear_caches()
