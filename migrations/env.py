"""Alembic environment: the models' metadata, and the URL from the caller or the settings."""

from __future__ import annotations

import logging.config

from alembic import context

from core.db import make_engine
from core.models import Base
from core.models.base import UTCDateTime

config = context.config
if config.config_file_name is not None and config.get_section("loggers"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from core.settings import get_settings

    return get_settings().database_url


def _render_item(type_, obj, autogen_context):
    # Migrations must not import application code that may change later: write the UTC
    # timestamp type as the plain SQLAlchemy type it stores as.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _options(url: str) -> dict:
    return {
        "target_metadata": target_metadata,
        "render_item": _render_item,
        # SQLite cannot ALTER most things; batch mode recreates the table instead.
        "render_as_batch": url.startswith("sqlite"),
        "compare_type": True,
    }


def run_migrations_offline() -> None:
    url = _database_url()
    context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **_options(url))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _database_url()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **_options(url))
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
