"""Alembic builds the schema on an empty Postgres and on SQLite, and the models and the
migrations agree (autogenerate finds no difference)."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from core.db import make_engine
from core.migrate import alembic_config, upgrade_head
from core.models import Base
from tests.conftest import create_postgres_database, drop_postgres_database

TABLES = {"api_keys", "files", "models", "jobs", "job_steps", "checkpoints", "events", "idempotency_keys",
          "webhooks", "webhook_deliveries", "alembic_version"}


def _diff(url: str) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def empty_postgres(postgres_server_url):
    url = create_postgres_database(postgres_server_url, prefix="sdpo_migrate")
    yield url
    drop_postgres_database(url)


def test_upgrade_head_on_empty_postgres_matches_the_models(empty_postgres):
    upgrade_head(empty_postgres)
    assert _tables(empty_postgres) == TABLES
    assert _diff(empty_postgres) == []


def test_upgrade_head_on_sqlite_matches_the_models_and_downgrades(tmp_path):
    url = f"sqlite:///{tmp_path / 'sdpo.db'}"
    upgrade_head(url)
    assert _tables(url) == TABLES
    assert _diff(url) == []
    command.downgrade(alembic_config(url), "base")
    assert _tables(url) == {"alembic_version"}
    upgrade_head(url)
    assert _diff(url) == []


def test_the_session_database_is_at_head(database_url):
    assert _diff(database_url) == []
