"""Apply Alembic migrations (`upgrade head`) to the configured database."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent


def alembic_config() -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    return config


def upgrade_database() -> None:
    from app.core.config import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    config = alembic_config()
    # The service configures logging itself; alembic.ini's config would replace its handlers.
    config.attributes["skip_logging"] = True
    command.upgrade(config, "head")
