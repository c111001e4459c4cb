"""The data migration 5c1d0e7a9b42, on Postgres and on SQLite: a database written by the earlier
version (stored webhook-create replies with the secret, deliveries with the receiver's reply in
`last_error`) comes out with the secret gone from the stored replies and a class in `last_error`;
everything else is left as it was."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import command

from core.db import make_engine
from core.migrate import alembic_config, upgrade_head

BEFORE = "e4b67df11643"
SECRET = "whsec_c2VjcmV0LWtleS1ieXRlcy0xMjM0NTY3OA=="
NOW = datetime(2026, 11, 30, tzinfo=UTC)


def test_upgrade_scrubs_secrets_and_replies_and_nothing_else(old_database):
    command.upgrade(alembic_config(old_database), BEFORE)
    meta = sa.MetaData()
    engine = make_engine(old_database)
    try:
        meta.reflect(engine, only=["idempotency_keys", "webhooks", "webhook_deliveries"])
        keys, hooks, deliveries = (meta.tables[n] for n in ("idempotency_keys", "webhooks", "webhook_deliveries"))
        hook_body = {"id": "wh-1", "object": "webhook", "url": "https://example.test/a", "events": ["job.failed"],
                     "description": None, "created_at": 1, "secret": SECRET}
        # A job whose metadata happens to hold the same text: not a webhook, left alone.
        job_body = {"id": "ftjob-1", "object": "fine_tuning.job", "metadata": {"note": SECRET}}
        legacy = {"d1": ("HTTP 500: <html>internal admin panel</html>", 500),
                  "d2": ("ConnectError: [Errno 111] Connection refused", None),
                  "d3": ("the webhook was deleted", None), "d4": (None, None), "d5": ("timeout", None)}
        with engine.begin() as conn:
            conn.execute(keys.insert(), [
                {"owner": "alice", "key": "k1", "request_hash": "0" * 64, "response_status": 200,
                 "response_body": hook_body, "created_at": NOW},
                {"owner": "alice", "key": "k2", "request_hash": "1" * 64, "response_status": 200,
                 "response_body": job_body, "created_at": NOW}])
            conn.execute(hooks.insert(), {"id": "wh-1", "owner": "alice", "url": "https://example.test/a",
                                          "secret": SECRET, "events": ["job.failed"], "created_at": NOW})
            conn.execute(deliveries.insert(), [
                {"id": d, "webhook_id": "wh-1", "owner": "alice", "event_type": "job.failed", "payload": {},
                 "status": "failed", "attempts": 8, "next_attempt_at": NOW, "last_status_code": code,
                 "last_error": text, "created_at": NOW} for d, (text, code) in legacy.items()])

        upgrade_head(old_database)

        with engine.connect() as conn:
            bodies = dict(conn.execute(sa.select(keys.c.key, keys.c.response_body)).all())
            errors = dict(conn.execute(sa.select(deliveries.c.id, deliveries.c.last_error)).all())
            kept_secret = conn.execute(sa.select(hooks.c.secret)).scalar_one()
        assert bodies == {"k1": {**hook_body, "secret": None}, "k2": job_body}
        assert errors == {"d1": "http_5xx", "d2": "network_error", "d3": "webhook_deleted", "d4": None,
                          "d5": "timeout"}
        assert kept_secret == SECRET  # the webhook still signs with it
    finally:
        engine.dispose()
